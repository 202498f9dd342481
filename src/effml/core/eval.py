"""Evaluation: perplexity (GPTQ / FlatQuant protocol) and fidelity to a reference model."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import NAMED_SOURCES, load_text, text_source_kind, tokenize_text
from .validate import check_token_ids

log = logging.getLogger(__name__)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows from the start of the text; the tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(
            f"seq_len={seq_len} is longer than the evaluation text ({tokens.numel()} tokens): "
            "use a shorter seq_len or a longer text"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(
    model,
    tokenizer=None,
    text: str | torch.Tensor = "wikitext2",
    seq_len: int = 1024,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seq_len`` windows of the text.

    Every window weighs the same and each predicts its ``seq_len - 1`` shifted tokens, as in the
    GPTQ / FlatQuant evaluation code.

    ``text`` is a tensor of token ids (flattened), or a string read by one rule, in this order:
    the path of an existing file -> that file's text; a known set name (``"wikitext2"``,
    ``"c4"``) -> its test split; anything else -> the string itself is the text (a single word
    that looks like a missing file's path, e.g. ``"data/x.txt"``, is refused instead).
    """
    literal = False
    if isinstance(text, torch.Tensor):
        tokens = check_token_ids(text.reshape(1, -1), model, what="text (token ids)")[0]
    else:
        if tokenizer is None:
            raise ValueError("perplexity needs a tokenizer unless text is a tensor of token ids")
        literal = text_source_kind(text) == "literal"
        tokens = tokenize_text(tokenizer, text if literal else load_text(text, "test"))
    try:
        windows = eval_windows(tokens, seq_len, max_windows)
    except ValueError as e:
        if literal:
            raise ValueError(
                f"{e}. text={text[:40]!r} was evaluated as literal text, since it is neither an existing file "
                f"nor one of {NAMED_SOURCES}"
            ) from e
        raise
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nlls = []
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            )
            nlls.append(loss.view(batch.shape[0], -1).mean(dim=1).cpu())
    finally:
        model.train(was_training)
    nll = torch.cat(nlls).mean().item()
    if not math.isfinite(nll):
        raise FloatingPointError("perplexity is not finite: the model produced NaN/inf logits")
    return math.exp(nll)


@torch.no_grad()
def fidelity(model, reference, input_ids: torch.Tensor, batch_size: int = 1) -> dict[str, float]:
    """How closely ``model`` follows ``reference`` on ``input_ids`` (no labels needed).

    Returns the mean over positions of KL(reference || model) in nats and the fraction of
    positions where both models rank the same token first.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    kl_sum, agree, n = 0.0, 0, 0
    dev_m, dev_r = _model_device(model), _model_device(reference)
    for batch in input_ids.split(batch_size):
        lp = F.log_softmax(model(input_ids=batch.to(dev_m), use_cache=False).logits.float(), -1).cpu()
        lq = F.log_softmax(reference(input_ids=batch.to(dev_r), use_cache=False).logits.float(), -1).cpu()
        kl_sum += (lq.exp() * (lq - lp)).sum(-1).sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        n += batch.numel()
    return {"kl": kl_sum / n, "top1_agreement": agree / n, "tokens": n}
