"""Empirical spectral density (ESD) analysis of every decoder linear: power-law alpha and the
shape / scale metrics AlphaPruning and WeightWatcher use, with CSV / JSON export and a cache
keyed by a fingerprint of the weights."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .powerlaw import EVALS_THRESH, XMIN_STRATEGIES, fit_power_law
from .spectrum import many_eigenvalues
from .units import prunable_units

log = logging.getLogger(__name__)

# metric name -> record field. Higher value = more sparsity for every one of them (the
# AlphaPruning convention: a heavier tail, smaller alpha, marks a more important layer).
METRICS = {
    "alpha_hill": "alpha",
    "alpha_hat": "alpha_hat",
    "stable_rank": "stable_rank",
    "entropy": "entropy",
    "spectral_norm": "spectral_norm",
}


@dataclass
class ESDRecord:
    """Spectral statistics of one linear (one role of a fused linear)."""

    block: int
    role: str
    name: str
    shape: tuple[int, int]
    n_evals: int  # min(out, in) eigenvalues of W^T W
    alpha: float  # power-law exponent of the tail (PL_Alpha_Hill)
    xmin: float
    D: float  # KS distance of the chosen fit
    n_tail: int
    lambda_max: float  # largest eigenvalue = sigma_max^2
    alpha_hat: float  # alpha * log10(lambda_max)
    stable_rank: float  # sum(lambda) / lambda_max
    spectral_norm: float  # lambda_max, as WeightWatcher names it
    entropy: float  # normalised spectral entropy in [0, 1]
    eigenvalues: np.ndarray | None = field(default=None, repr=False)  # not exported

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def row(self) -> dict:
        d = asdict(self)
        d.pop("eigenvalues")
        d["shape"] = f"{self.shape[0]}x{self.shape[1]}"
        return d


class ESDResult(list):
    """A list of :class:`ESDRecord` (block order, role order) with export and aggregation."""

    def __init__(self, records=(), metric: str = "alpha_hill", xmin: str = "peak", seconds: float = 0.0):
        super().__init__(records)
        self.metric = metric
        self.xmin = xmin
        self.seconds = seconds

    def values(self, metric: str | None = None) -> np.ndarray:
        return np.array([getattr(r, METRICS[_check_metric(metric or self.metric)]) for r in self], dtype=np.float64)

    def per_block(self, metric: str | None = None) -> dict[int, float]:
        """Unweighted mean of the metric over each block's matrices (the reference's block_wise)."""
        vals = self.values(metric)
        out: dict[int, list[float]] = {}
        for r, v in zip(self, vals):
            out.setdefault(r.block, []).append(float(v))
        return {b: float(np.mean(v)) for b, v in sorted(out.items())}

    def rows(self) -> list[dict]:
        return [r.row() for r in self]

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.rows()
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
        return path

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"metric": self.metric, "xmin": self.xmin, "records": self.rows()}, indent=1))
        return path


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    return metric


def weights_fingerprint(weights: list[torch.Tensor]) -> str:
    """A hash of the matrices: shape, dtype, the exact bytes of a strided sample, and float64 row
    sums, column sums and sum of squares. One cheap pass; any realistic edit of the weights
    (pruning, quantization, fine-tuning) changes it."""
    h = hashlib.blake2b(digest_size=16)
    for w in weights:
        w = w.detach()
        h.update(repr((tuple(w.shape), str(w.dtype))).encode())
        flat = w.reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
        if w.dim() == 2:
            h.update(w.sum(dim=0, dtype=torch.float64).cpu().numpy().tobytes())
            h.update(w.sum(dim=1, dtype=torch.float64).cpu().numpy().tobytes())
        h.update(np.float64(torch.linalg.vector_norm(w, dtype=torch.float64).item()).tobytes())
    return h.hexdigest()


_CACHE: dict[tuple, list[dict]] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _matrices(model: nn.Module) -> list[tuple[int, str, str, torch.Tensor]]:
    return [(u.block, u.role, u.name, u.weight) for u in prunable_units(model)]


def _record(block, role, name, w_shape, ev: np.ndarray, xmin: str, compat: bool, thresh: float) -> ESDRecord:
    fit = fit_power_law(ev, xmin=xmin, compat=compat, thresh=thresh)
    lam_max = float(ev[-1])
    total = float(ev.sum())
    pos = ev[ev > 0]
    p = pos / pos.sum()
    entropy = float(-(p * np.log(p)).sum() / math.log(pos.size)) if pos.size > 1 else 0.0
    return ESDRecord(
        block=block, role=role, name=name, shape=(int(w_shape[0]), int(w_shape[1])), n_evals=int(ev.size),
        alpha=fit.alpha, xmin=fit.xmin, D=fit.D, n_tail=fit.n_tail, lambda_max=lam_max,
        alpha_hat=fit.alpha * math.log10(lam_max), stable_rank=total / lam_max, spectral_norm=lam_max,
        entropy=entropy, eigenvalues=ev,
    )


def esd(
    model: nn.Module,
    metric: str = "alpha_hill",
    xmin: str = "peak",
    compat: bool = False,
    thresh: float = EVALS_THRESH,
    cache: bool = True,
    keep_eigenvalues: bool = True,
    workers: int | None = None,
) -> ESDResult:
    """Per-matrix spectral records of every decoder linear (embeddings and head excluded).

    ``xmin``: tail start strategy, one of ``"peak"`` (default), ``"median"``, ``"scan"`` (see
    :func:`effml.prune.powerlaw.fit_power_law`); ``compat`` reproduces the reference's
    lower-bound bug for ``"peak"``. ``metric`` names the value allocation uses
    (``ESDResult.values()``); every record carries all metrics.
    """
    _check_metric(metric)
    if xmin not in XMIN_STRATEGIES:
        raise ValueError(f"xmin must be one of {XMIN_STRATEGIES}, got {xmin!r}")
    start = time.perf_counter()
    mats = _matrices(model)
    if not mats:
        raise ValueError("the model has no decoder linears to analyse")
    key = (weights_fingerprint([m[3] for m in mats]), xmin, bool(compat), float(thresh))
    if cache and key in _CACHE:
        records = [ESDRecord(**d) for d in _CACHE[key]]
        log.info("ESD cache hit (%s)", key[0])
    else:
        evs = many_eigenvalues([m[3] for m in mats], workers=workers)
        records = [
            _record(b, role, name, tuple(w.shape), ev, xmin, compat, thresh) for (b, role, name, w), ev in zip(mats, evs)
        ]
        if cache:
            _CACHE[key] = [asdict(r) for r in records]
    if not keep_eigenvalues:
        for r in records:
            r.eigenvalues = None
    seconds = time.perf_counter() - start
    log.info("ESD of %d matrices in %.2fs (xmin=%s)", len(records), seconds, xmin)
    return ESDResult(records, metric=metric, xmin=xmin, seconds=seconds)
