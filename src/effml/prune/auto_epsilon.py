"""``epsilon="auto"``: pick AlphaPruning's range epsilon per model and target by a cheap proxy.

effml's own addition, beyond the reference implementation (which takes a fixed ``--epsilon``,
0.3 by default). A fixed epsilon is not safe across models: on Gemma-3-270M, Wanda at 60% with
epsilon 0.3 gives 1.46x the perplexity of uniform allocation, while on SmolLM2-135M at 70% it gives
0.35x. The choice is made on calibration data, so the default is never worse than uniform there:

1. Split the calibration windows: up to ``STATS_TOKENS`` tokens for statistics and a held-back
   tail of up to ``EVAL_TOKENS`` tokens for the loss (both the same windows when there is one).
2. Through the core :class:`~effml.core.calibrate.LayerwiseEngine` (one pass, dense inputs), per
   block: collect the dense model's input norms on the statistics windows, then, for every
   candidate allocation, apply one-shot Wanda masks (|W| * ||x||, per output row) at that
   allocation's ratios, run the candidate's own held-back hidden states through the block, and
   restore the dense weights. Per matrix the scores are sorted once and shared by all candidates.
3. Mean next-token NLL of each candidate on the held-back windows, through the model's own tail
   (:func:`~effml.core.calibrate.logits_from_hidden`). The lowest wins; ties go to the smaller
   epsilon. 0 (uniform) is always a candidate.

The proxy is the same one-shot Wanda pruning for ``method="wanda"``, ``"sparsegpt"`` and
``"magnitude"`` (so it needs calibration data even for magnitude): it ranks allocations, and the
real pruner then runs once at the chosen one.

Cost: with s statistics and h held-back windows and K candidates, (2s + (K + 1)h) window forwards
per block plus K lm_head passes over the h windows; s and h are capped by token counts (one
window each at the paper's 2048-token windows), whatever the calibration size. A Wanda run does
2n window forwards per block over all n calibration windows: at the paper's 128 x 2048 the proxy
is a few percent of that, at effml's CLI default of 32 x 512 about a third; with only a handful
of windows it can cost more than the Wanda pass (it still scores K allocations). The ESD is
computed once and shared with the real run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.calibrate import LayerwiseEngine, logits_from_hidden
from .masks import count_for, nm_mask, wanda_scores
from .stats import InputSqNorms, block_units
from .units import Unit

log = logging.getLogger(__name__)

AUTO_CANDIDATES = (0.0, 0.1, 0.2, 0.3, 0.4)
# Token budgets. On Gemma-3-270M (Wanda 60%) 1024 + 512 picked epsilon 0.2, 1.18x uniform's real
# perplexity: masks from fewer statistics rank allocations worse, and single 512-token windows
# disagree (1 of 8 favoured 0.2 over 0 even with 4096 statistics tokens).
STATS_TOKENS = 2048
EVAL_TOKENS = 1024
TIE_TOL = 1e-6  # nats: closer proxy losses count as a tie (-> the smaller epsilon)
_LOGIT_CHUNK = 512  # positions per lm_head call: bounds the [chunk, vocab] logits (Gemma: 262k)

# per unit: target ratio, and N of the N:M pattern (None: unstructured)
Allocation = tuple[np.ndarray, "np.ndarray | None"]


@dataclass
class ProxyResult:
    losses: list[float]  # mean NLL per allocation on the held-back windows
    dense_loss: float  # the unpruned model on the same windows (NaN unless asked for)
    stats_tokens: int
    eval_tokens: int
    held_back: bool  # False: one window, used for both statistics and loss
    seconds: float


def split_calibration(calib: torch.Tensor, stats_tokens: int = STATS_TOKENS,
                      eval_tokens: int = EVAL_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics windows, held-back windows) from ``[n, seq_len]`` calibration ids: the last
    ``h`` windows (about ``eval_tokens``, at most a quarter of them) are held back and up to
    ``stats_tokens`` of the first ones give the statistics. One window serves as both."""
    n, seq_len = calib.shape
    if n < 2:
        return calib, calib
    h = max(1, min(n // 4, math.ceil(eval_tokens / seq_len)))
    s = min(n - h, math.ceil(stats_tokens / seq_len))
    return calib[:s], calib[n - h:]


class _RowRanks:
    """One matrix's Wanda scores ranked once per output row; :meth:`mask` then reproduces
    :func:`effml.prune.masks.row_mask` at any ratio with a comparison instead of a top-k."""

    def __init__(self, scores: torch.Tensor):
        self.vals, order = torch.sort(scores, dim=1)
        cols = scores.shape[1]
        self.ranks = torch.empty_like(order).scatter_(
            1, order, torch.arange(cols, device=order.device).expand_as(order).contiguous())

    def mask(self, ratio: float) -> torch.Tensor:
        """round(ratio * numel) lowest in all: k or k+1 per row, the extra ones in the rows whose
        (k+1)-th lowest score is smallest, as row_mask does."""
        rows, cols = self.vals.shape
        k, extra = divmod(count_for(rows * cols, ratio), rows)
        counts = torch.full((rows,), k, dtype=self.ranks.dtype, device=self.vals.device)
        if extra:
            counts[torch.topk(self.vals[:, k], extra, largest=False).indices] += 1
        return self.ranks < counts.reshape(-1, 1)


@torch.no_grad()
def _nll_sum(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor) -> float:
    """Summed next-token NLL of ``ids`` given the last decoder layer's outputs ``hidden``. The
    tail (final norm, lm_head, softcapping) acts per position, so it runs on chunks of them."""
    total, length = 0.0, ids.shape[1]
    for a in range(0, length - 1, _LOGIT_CHUNK):
        b = min(a + _LOGIT_CHUNK, length - 1)
        logits = logits_from_hidden(model, ids[:, a:b], hidden[:, a:b]).float()
        labels = ids[:, a + 1:b + 1].to(logits.device)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
    return total


@torch.no_grad()
def proxy_losses(model: nn.Module, units: list[Unit], allocations: Sequence[Allocation], stats_ids: torch.Tensor,
                 eval_ids: torch.Tensor, m: int | None = None, device=None, batch_size: int = 1,
                 dense: bool = True) -> ProxyResult:
    """Mean NLL on ``eval_ids`` of ``model`` with every unit one-shot Wanda-pruned at each
    allocation's ratio (ratio 0 / N = 0: dense), masks from the dense model's input norms on
    ``stats_ids``. One pass of the core engine; the model's weights are restored at the end.
    ``dense``: also score the unpruned model (one more lm_head pass over ``eval_ids``)."""
    start = time.perf_counter()
    held_back = stats_ids is not eval_ids
    ids = torch.cat([stats_ids, eval_ids]) if held_back else stats_ids
    if held_back and stats_ids.shape[0] % batch_size:
        batch_size = 1  # no batch may straddle the statistics and the loss windows
    n_stats_batches = math.ceil(stats_ids.shape[0] / batch_size)
    engine = LayerwiseEngine(model, ids, device=device, batch_size=batch_size)
    n_batches = len(engine.capture.hidden)
    stat_b = list(range(n_stats_batches))
    eval_b = list(range(n_stats_batches, n_batches)) if held_back else stat_b
    eval_batches = list(eval_ids.split(batch_size))
    index = {id(u): i for i, u in enumerate(units)}
    # per allocation, its held-back hidden states; None while it has pruned nothing yet (= dense)
    streams: list[list[torch.Tensor] | None] = [None] * len(allocations)

    def key_of(a: Allocation, i: int):
        ratios, ns = a
        if ns is not None:
            return None if int(ns[i]) == 0 else ("nm", int(ns[i]))
        return None if float(ratios[i]) == 0.0 else ("row", float(ratios[i]))

    def callback(ctx):
        mine = block_units(units, ctx.index)
        norms = InputSqNorms()
        with ctx.hooks({u.ref.path: u.ref.module for u in mine}, norms):
            for b in stat_b:
                ctx.run_batch(b)
        originals = [u.weight.clone() for u in mine]
        scores: dict[int, torch.Tensor] = {}
        ranked: dict[int, _RowRanks] = {}
        applied: list = [None] * len(mine)  # what each unit holds now (None: dense)
        try:
            for c, alloc in enumerate(allocations):
                if streams[c] is None:
                    if all(key_of(alloc, index[id(u)]) is None for u in mine):
                        continue  # still the dense model up to here: share the engine's stream
                    streams[c] = [ctx.inputs[b] for b in eval_b]  # dense inputs ("original" mode)
                for j, u in enumerate(mine):
                    key = key_of(alloc, index[id(u)])
                    if key == applied[j]:
                        continue
                    if key is None:
                        u.set_weight(originals[j])
                    else:
                        if j not in scores:
                            scores[j] = wanda_scores(originals[j], norms.sq[u.ref.path])
                        if key[0] == "nm":
                            mask = nm_mask(scores[j], key[1], m)
                        else:
                            if j not in ranked:
                                ranked[j] = _RowRanks(scores[j])
                            mask = ranked[j].mask(key[1])
                        u.set_weight(originals[j].masked_fill(mask.to(originals[j].device), 0))
                    applied[j] = key
                streams[c] = [ctx.run_batch(b, hidden=h).to(engine.offload_device) for b, h in zip(eval_b, streams[c])]
        finally:
            for j, u in enumerate(mine):
                if applied[j] is not None:
                    u.set_weight(originals[j])
        return None

    final = engine.run(callback, propagate="original", desc="epsilon proxy")
    n_tokens = eval_ids.shape[0] * (eval_ids.shape[1] - 1)

    def mean_nll(hidden: list[torch.Tensor]) -> float:
        loss = sum(_nll_sum(model, ids_b, h) for ids_b, h in zip(eval_batches, hidden)) / n_tokens
        return loss if math.isfinite(loss) else math.inf

    dense_loss = mean_nll([final[b] for b in eval_b]) if dense or any(s is None for s in streams) else math.nan
    losses = [dense_loss if s is None else mean_nll(s) for s in streams]
    return ProxyResult(losses, dense_loss, stats_ids.numel(), eval_ids.numel(), held_back,
                       time.perf_counter() - start)


def choose(candidates: Sequence[float], losses: Sequence[float], tol: float = TIE_TOL) -> float:
    """The candidate with the lowest loss; within ``tol`` of it, the smallest candidate."""
    best = min(losses)
    return min(c for c, loss in zip(candidates, losses) if loss <= best + tol)


def select_epsilon(model: nn.Module, units: list[Unit], allocate: Callable[[float], Allocation],
                   candidates: Sequence[float], calib: torch.Tensor, m: int | None = None, device=None,
                   batch_size: int = 1) -> tuple[float, dict]:
    """Run the proxy over ``allocate(eps)`` for every candidate; returns (chosen epsilon, report).
    Candidates giving the same allocation (e.g. after N:M rounding) are scored once."""
    start = time.perf_counter()
    allocs = [allocate(float(e)) for e in candidates]
    unique: list[Allocation] = []
    slot: list[int] = []
    for a in allocs:
        for k, u in enumerate(unique):
            if np.array_equal(a[0], u[0]) and (a[1] is None or np.array_equal(a[1], u[1])):
                slot.append(k)
                break
        else:
            slot.append(len(unique))
            unique.append(a)
    stats_ids, eval_ids = split_calibration(calib)
    if len(unique) == 1:  # nothing to rank (e.g. all blocks have the same metric)
        res = ProxyResult([math.nan], math.nan, 0, 0, False, 0.0)
    else:
        res = proxy_losses(model, units, unique, stats_ids, eval_ids, m, device, batch_size, dense=False)
    losses = [res.losses[k] for k in slot]
    chosen = float(min(candidates)) if len(unique) == 1 else choose(candidates, losses)
    report = {
        "candidates": [float(e) for e in candidates],
        "proxy_losses": [None if math.isnan(v) else v for v in losses],
        "chosen": chosen,
        "proxy": "one-shot Wanda masks from dense input norms; mean NLL on held-back calibration windows",
        "stats_tokens": res.stats_tokens,
        "eval_tokens": res.eval_tokens,
        "held_back": res.held_back,
        "seconds": round(time.perf_counter() - start, 3),
    }
    shown = ", ".join(f"{e:g}: {v:.4f}" for e, v in zip(candidates, losses))
    log.info("epsilon='auto': proxy NLL {%s} -> epsilon %g (%.1fs)", shown, chosen, report["seconds"])
    return chosen, report
