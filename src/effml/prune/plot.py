"""ESD figures (needs matplotlib, the ``plot`` extra): alpha per block and role, allocated
sparsity per block, and log-log ESDs with the fitted power-law tail."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .esd import ESDResult


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ModuleNotFoundError("plot_esd needs matplotlib: pip install 'effml[plot]'") from e
    return plt


def plot_esd(
    result: ESDResult,
    path: str | os.PathLike,
    sparsity: Sequence[float] | dict | None = None,
    matrices: Sequence[str] | None = None,
) -> Path:
    """Save a PNG: alpha per block (block mean and each role), the allocated sparsity per block
    (``sparsity``: per-block list, or a prune report's ``layers`` / ``model.effml_report``), and
    the ESD of ``matrices`` (record names; default the first and last block's ``q``/``down``)."""
    plt = _pyplot()
    if not result:
        raise ValueError("the ESD result is empty")
    if matrices is None:
        blocks = [result[0].block, result[-1].block]
        matrices = [r.name for r in result if r.block in blocks and r.role in ("q", "down")]
    chosen = [r for r in result if r.name in set(matrices)]
    missing = set(matrices) - {r.name for r in chosen}
    if missing:
        raise ValueError(f"unknown matrices {sorted(missing)}; names are like {result[0].name!r}")
    if any(r.eigenvalues is None for r in chosen):
        raise ValueError("these records have no eigenvalues: run esd(..., keep_eigenvalues=True)")
    per_block = _block_sparsity(sparsity)
    n_panels = 1 + (per_block is not None) + len(chosen)
    cols = min(3, n_panels)
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    axes = list(axes.ravel())
    ax = axes.pop(0)
    roles = sorted({r.role for r in result}, key=[r.role for r in result].index)
    for role in roles:
        rs = [r for r in result if r.role == role]
        ax.plot([r.block for r in rs], [r.alpha for r in rs], ".", alpha=0.6, label=role)
    means = result.per_block("alpha_hill")
    ax.plot(list(means), list(means.values()), "k-", lw=2, label="block mean")
    ax.set(xlabel="block", ylabel="alpha", title=f"power-law alpha (xmin={result.xmin})")
    ax.legend(fontsize=7, ncol=2)
    if per_block is not None:
        ax = axes.pop(0)
        ax.bar(range(len(per_block)), per_block)
        ax.set(xlabel="block", ylabel="sparsity", title="allocated sparsity per block", ylim=(0, 1))
    for r in chosen:
        ax = axes.pop(0)
        ev = r.eigenvalues[r.eigenvalues > 0]
        bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), 60)
        dens, edges = np.histogram(ev, bins=bins, density=True)
        centers = np.sqrt(edges[1:] * edges[:-1])
        ax.loglog(centers[dens > 0], dens[dens > 0], ".", label="ESD")
        tail = ev[ev >= r.xmin]
        frac = tail.size / ev.size
        x = np.logspace(np.log10(r.xmin), np.log10(ev.max()), 50)
        # fitted density on the tail, scaled by the tail's share of the eigenvalues
        ax.loglog(x, frac * (r.alpha - 1) / r.xmin * (x / r.xmin) ** (-r.alpha), "r-", label=f"alpha={r.alpha:.2f}")
        ax.axvline(r.xmin, color="gray", ls="--", lw=1)
        ax.set(xlabel="eigenvalue", ylabel="density", title=r.name)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _block_sparsity(sparsity) -> list[float] | None:
    if sparsity is None:
        return None
    if isinstance(sparsity, dict):
        layers = sparsity.get("layers") or (sparsity.get("prune") or {}).get("layers")
        if layers is None:
            raise ValueError("sparsity dict must be a prune report or model.effml_report")
        by_block: dict[int, list] = {}
        for layer in layers:
            by_block.setdefault(layer["block"], []).append((layer["target"], np.prod(layer["shape"])))
        return [float(sum(t * n for t, n in v) / sum(n for _, n in v)) for _, v in sorted(by_block.items())]
    return [float(s) for s in sparsity]
