"""Eigenvalues of W^T W for many weight matrices, fast on CPU.

The eigenvalues of the smaller Gram matrix (W^T W or W W^T, float64) are the squared singular
values of W. Forming the Gram in float64 and calling LAPACK's ``syevr`` costs a fraction of an
SVD. Small LAPACK calls scale badly with threads (and collapse when the cores are shared), so
each call runs single-threaded and the matrices are spread over a small thread pool instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np
import scipy.linalg
import torch


def gram_eigenvalues(weight: torch.Tensor) -> np.ndarray:
    """Ascending float64 eigenvalues of the smaller Gram matrix of ``weight`` (= sigma^2)."""
    w = weight.detach().to("cpu", torch.float64).numpy()
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    ev = scipy.linalg.eigvalsh(g, driver="evr", overwrite_a=True, check_finite=False)
    return np.clip(ev, 0.0, None)  # rounding can leave tiny negatives; sigma^2 >= 0


@contextmanager
def _single_threaded_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own thread count
        ctx = nullcontext()
    else:
        ctx = threadpool_limits(1)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ctx:
            yield
    finally:
        torch.set_num_threads(old)


def many_eigenvalues(weights: Sequence[torch.Tensor], workers: int | None = None) -> list[np.ndarray]:
    """:func:`gram_eigenvalues` for every weight, in order, on a pool of ``workers`` threads
    (default: the cores torch may use, at most 8)."""
    if workers is None:
        workers = max(1, min(8, torch.get_num_threads(), os.cpu_count() or 1))
    with _single_threaded_blas():
        if workers == 1:
            return [gram_eigenvalues(w) for w in weights]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(gram_eigenvalues, weights))
