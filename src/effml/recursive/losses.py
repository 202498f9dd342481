"""Distillation losses over next-token distributions (token-mean, in nats)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KD_KINDS = ("forward_kl", "reverse_kl")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
            temperature: float = 1.0) -> torch.Tensor:
    """``forward_kl`` = KL(teacher || student) (mode-covering, the RRT choice); ``reverse_kl`` =
    KL(student || teacher). Scaled by T^2 so gradients keep their size across temperatures."""
    if kind not in KD_KINDS:
        raise ValueError(f"unknown kd {kind!r}; choose one of {KD_KINDS}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    if kind == "forward_kl":
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    else:
        kl = F.kl_div(t, s, log_target=True, reduction="batchmean")
    return kl * temperature**2


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())
