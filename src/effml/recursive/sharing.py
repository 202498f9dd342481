"""Which depths share a block (strategy) and what the shared block starts as (init)."""

from __future__ import annotations

import numpy as np

DIVISIBLE_NOTE = (
    "'cycle' and 'sequence' need num_loops to divide the layer count; 'middle_cycle' keeps the first and "
    "last layers unique and needs num_loops to divide (layers - 2)"
)


def share_groups(num_layers: int, num_loops: int, strategy: str) -> list[list[int]]:
    """Depth groups, one per stored block, each listing the depths (0-indexed) that use it.

    Layers that stay unique (``middle_cycle``'s first and last) are groups of one. Groups are
    ordered by their first depth.
    """
    if strategy == "middle_cycle":
        if num_layers < 3:
            raise ValueError(f"middle_cycle needs at least 3 layers, the model has {num_layers}")
        inner = _groups(num_layers - 2, num_loops, "cycle", strategy, num_layers)
        return [[0]] + [[d + 1 for d in g] for g in inner] + [[num_layers - 1]]
    return _groups(num_layers, num_loops, strategy, strategy, num_layers)


def _groups(n: int, loops: int, kind: str, strategy: str, num_layers: int) -> list[list[int]]:
    if n % loops != 0:
        allowed = [b for b in range(1, n + 1) if n % b == 0]
        raise ValueError(
            f"num_loops={loops} does not divide the {n} layers that strategy {strategy!r} shares "
            f"(model has {num_layers} layers); allowed num_loops for {strategy!r}: {allowed}. {DIVISIBLE_NOTE}"
        )
    k = n // loops
    if kind == "cycle":
        return [[i + r * k for r in range(loops)] for i in range(k)]
    return [[i * loops + r for r in range(loops)] for i in range(k)]


def stepwise_layers(first: int, last: int, k: int) -> list[int]:
    """K layers at a fixed interval keeping both ends: round(linspace(first, last, K)) with
    round-half-to-even, as in the reference code (6 layers -> [0, 2, 5])."""
    if k == 1:
        return [first]
    return [round(x) for x in np.linspace(first, last, k).tolist()]


def init_sources(groups: list[list[int]], init: str) -> list[list[int]]:
    """For each group, the original layers whose weights are averaged into its shared block.

    ``stepwise``: one layer per shared group, picked at a fixed interval over the shared range;
    ``lower``: the first K layers of the shared range; ``average``: all the group's depths.
    Groups of one (unique layers) always keep their own layer.
    """
    shared = [i for i, g in enumerate(groups) if len(g) > 1]
    out = [list(g) for g in groups]
    if init == "average" or not shared:
        return out
    depths = sorted(d for i in shared for d in groups[i])
    first, last, k = depths[0], depths[-1], len(shared)
    picks = stepwise_layers(first, last, k) if init == "stepwise" else list(range(first, first + k))
    for i, layer in zip(shared, picks):
        out[i] = [layer]
    return out
