"""The engine's per-depth KV pool, and the per-row masks and rotary tables a block call needs.

The pool is handed to the Hugging Face decoder layers as their ``cache``: their attention calls
``cache.update(key, value, layer_idx)`` and attends over what comes back. Before each layer call
the engine *binds* the pool to the batch (which slot, depth and position every row has), so
``update`` writes each row's new K/V at ``[depth, slot, :, position]`` and returns each row's
keys/values ``0 .. max_len`` padded to the longest row; the additive mask hides the padding.
"""

from __future__ import annotations

import inspect

import torch


class KVPool:
    """Keys and values for ``num_depths`` depths x ``slots`` requests x ``max_tokens`` positions.

    Memory is allocated once, so the KV budget is fixed: ``2 * depths * slots * kv_heads *
    max_tokens * head_dim`` elements. Positions past a row's length may hold a previous
    request's values; they are always masked out.
    """

    def __init__(self, num_depths: int, slots: int, max_tokens: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_depths, slots, kv_heads, max_tokens, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._slots = self._start = self._offset = None
        self._length = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def bind(self, slots: torch.Tensor, start: torch.Tensor, length: int, depth_offset: torch.Tensor) -> None:
        """Rows ``i`` of the next layer calls write positions ``start[i] .. start[i]+T-1`` of slot
        ``slots[i]`` at depth ``depth_offset[i] + layer_idx`` and read keys ``0 .. length-1``."""
        self._slots, self._start, self._offset, self._length = slots, start, depth_offset, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        depth = self._offset + layer_idx
        t = key_states.shape[2]
        if t == 1:  # decode: one new position per row, rows at different depths/slots/positions
            self.keys[depth, self._slots, :, self._start] = key_states[:, :, 0]
            self.values[depth, self._slots, :, self._start] = value_states[:, :, 0]
        else:  # prefill: one request, a run of positions
            if key_states.shape[0] != 1:
                raise RuntimeError("multi-token writes are for one request at a time (prefill)")
            d, s, p = int(depth[0]), int(self._slots[0]), int(self._start[0])
            self.keys[d, s, :, p:p + t] = key_states[0]
            self.values[d, s, :, p:p + t] = value_states[0]
        n = self._length
        return self.keys[depth, self._slots, :, :n], self.values[depth, self._slots, :, :n]

    def copy_position(self, slots: torch.Tensor, positions: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
        """Early-exit fill: K/V at ``[dst[i, c], slots[i], :, positions[i]]`` := those at depth
        ``src[i, c]`` (``src``/``dst``: ``[rows, copies]`` depth indices)."""
        s, p = slots[:, None], positions[:, None]
        self.keys[dst, s, :, p] = self.keys[src, s, :, p]
        self.values[dst, s, :, p] = self.values[src, s, :, p]


def depth_windows(config, num_depths: int) -> list[int | None]:
    """Sliding-window size of each depth (``None`` = full causal attention), as the HF models
    choose their masks: by ``config.layer_types`` when present, else one ``sliding_window`` for all."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is not None:
        return [window if types[d] == "sliding_attention" else None for d in range(num_depths)]
    return [window] * num_depths


def depth_types(config, num_depths: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    return list(types[:num_depths]) if types is not None else ["full_attention"] * num_depths


def attention_bias(start: torch.Tensor, t: int, length: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, 1, t, length]`` additive mask: query ``start[i] + j`` sees keys ``<=`` itself (and
    within ``window`` when sliding, as HF's ``kv > q - window``); everything else gets the dtype's
    minimum, as HF's eager masks do."""
    q = start[:, None] + torch.arange(t, device=start.device)[None, :]
    kv = torch.arange(length, device=start.device)
    ok = kv[None, None, :] <= q[:, :, None]
    if window is not None:
        ok = ok & (kv[None, None, :] > q[:, :, None] - window)
    zero = torch.zeros((), dtype=dtype, device=start.device)
    return torch.where(ok, zero, torch.finfo(dtype).min)[:, None]


class RotaryTables:
    """cos/sin per row from the model's own rotary module; models with one rotary per layer type
    (Gemma 3: local and global bases) are asked per type."""

    def __init__(self, rotary):
        self.rotary = rotary
        self.per_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
        if self.rotary is None:
            return None
        if self.per_type:
            return self.rotary(x, position_ids, layer_type)
        return self.rotary(x, position_ids)


def pick_rows(options: dict, keys: list, rows_key: torch.Tensor | None):
    """One per-row tensor (or tuple of tensors) from ``options[key]``, where row ``i`` uses key
    ``keys[rows_key[i]]``; when every row uses the same key, that entry as is."""
    if rows_key is None or len(keys) == 1:
        return options[keys[0]]
    stacked = [options[k] for k in keys]
    rows = torch.arange(rows_key.shape[0], device=rows_key.device)
    if isinstance(stacked[0], tuple):
        return tuple(torch.stack(parts)[rows_key, rows] for parts in zip(*stacked))
    return torch.stack(stacked)[rows_key, rows]
