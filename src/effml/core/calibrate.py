"""The layer-by-layer calibration engine every method uses.

1. Capture: every decoder layer is swapped for an identity recorder and the model runs on the
   calibration batches. That yields the first layer's input hidden states and, for *every*
   layer, the keyword arguments it is called with (masks, position embeddings, ...). Families
   whose layers differ in mask or rotary (Gemma's sliding/global layers) are thus handled
   without knowing about them. Identical tensors are stored once.
2. Visit blocks in order. Only the current block is on the compute device; activations live on
   the offload device (CPU). A method callback may observe (hooks) and modify the block.
3. The next block's inputs are the outputs of either the original block (``propagate=
   "original"``, computed before the callback) or the modified one (``"compressed"``).
   ``"both"`` keeps two streams: the callback sees the compressed model's inputs and, as
   ``fp_outputs``, the original block's outputs on the original model's inputs.
   "Original" means the block as it stands when visited: a method must not switch on its
   quantizers in blocks the engine has not reached yet (FlatQuant arms one block at a time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch import ArchSpec, get_arch, get_submodule
from .validate import check_token_ids

log = logging.getLogger(__name__)

PROPAGATE_MODES = ("compressed", "original", "both")


class _StopForward(Exception):
    pass


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class _TensorStore:
    """Keeps one copy of equal tensors (the same mask / rotary table for every layer and batch)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._by_key: dict[tuple, list[torch.Tensor]] = {}
        self._by_id: dict[int, torch.Tensor] = {}

    def add(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) in self._by_id:
            return self._by_id[id(t)]
        key = (tuple(t.shape), t.dtype)
        for cand in self._by_key.get(key, []):
            if torch.equal(cand, t.to(cand.device)):
                self._by_id[id(t)] = cand
                return cand
        stored = t.detach().to(self.device)
        self._by_key.setdefault(key, []).append(stored)
        self._by_id[id(t)] = stored
        return stored

    def end_batch(self):
        self._by_id.clear()  # ids may be reused by the allocator across batches


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its call and passes input through."""

    def __init__(self, index: int, sink: _Capture):
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.record(self.index, hidden_states, args, kwargs)
        return hidden_states


@dataclass
class _Capture:
    store: _TensorStore
    n_layers: int
    hidden: list[torch.Tensor] = field(default_factory=list)  # layer-0 input per batch
    # per batch, per layer: (args, kwargs) with tensors from the store
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)
    _current: list | None = None

    def start_batch(self):
        self._current = [None] * self.n_layers

    def record(self, index, hidden_states, args, kwargs):
        if index == 0:
            self.hidden.append(hidden_states.detach().to(self.store.device))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        self._current[index] = (_map_tensors(args, self.store.add), _map_tensors(kwargs, self.store.add))

    def end_batch(self):
        if any(c is None for c in self._current):
            missing = [i for i, c in enumerate(self._current) if c is None]
            raise RuntimeError(f"decoder layers {missing} were not called during capture")
        self.calls.append(self._current)
        self.store.end_batch()


@contextmanager
def _swapped_layers(model: nn.Module, arch: ArchSpec, replacement: Callable[[int], nn.Module]):
    layers = get_submodule(model, arch.layers)
    originals = list(layers)
    try:
        for i in range(len(layers)):
            layers[i] = replacement(i)
        yield layers
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _outside_layer_modules(model: nn.Module, arch: ArchSpec) -> list[nn.Module]:
    paths = [arch.embed, arch.final_norm, arch.rotary]
    return [get_submodule(model, p) for p in paths if p]


def _batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(input_ids.split(batch_size))


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, device: torch.device | str, batch_size: int = 1,
    offload_device: torch.device | str = "cpu",
) -> _Capture:
    """Run the model with identity layers; record layer-0 inputs and every layer's kwargs."""
    arch = get_arch(model)
    input_ids = check_token_ids(input_ids, model, what="calibration input_ids")
    device, offload = torch.device(device), torch.device(offload_device)
    layers = get_submodule(model, arch.layers)
    cap = _Capture(_TensorStore(offload), len(layers))
    outside = _outside_layer_modules(model, arch)
    homes = [next(m.parameters(), torch.empty(0)).device for m in outside]
    for m in outside:
        m.to(device)
    final_norm = get_submodule(model, arch.final_norm)

    def stop(*_):
        raise _StopForward

    handle = final_norm.register_forward_pre_hook(stop)
    try:
        with _swapped_layers(model, arch, lambda i: _Recorder(i, cap)):
            for ids in _batches(input_ids, batch_size):
                cap.start_batch()
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                cap.end_batch()
    finally:
        handle.remove()
        for m, home in zip(outside, homes):
            m.to(home)
    return cap


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


class BlockContext:
    """What a method callback sees for one decoder block."""

    def __init__(self, engine: LayerwiseEngine, index: int, block: nn.Module, inputs: list[torch.Tensor]):
        self.engine = engine
        self.index = index
        self.block = block
        self.inputs = inputs
        self.fp_outputs: list[torch.Tensor] | None = None
        self.fp_inputs: list[torch.Tensor] | None = None  # propagate="both": the original model's inputs
        self.stats: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"{self.engine.arch.layers}.{self.index}"

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def n_batches(self) -> int:
        return len(self.inputs)

    def call_args(self, b: int) -> tuple[tuple, dict]:
        args, kwargs = self.engine.capture.calls[b][self.index]
        to = lambda t: t.to(self.device)  # noqa: E731
        return _map_tensors(args, to), _map_tensors(kwargs, to)

    def run_batch(self, b: int, block: nn.Module | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Block output for batch ``b`` on the compute device (keeps autograd if enabled)."""
        block = self.block if block is None else block
        hidden = self.inputs[b] if hidden is None else hidden
        args, kwargs = self.call_args(b)
        return _block_output(block(hidden.to(self.device), *args, **kwargs))

    @torch.no_grad()
    def forward(self, block: nn.Module | None = None, keep: bool = True) -> list[torch.Tensor] | None:
        """Run the block over all calibration batches (hooks fire); outputs go to the offload device."""
        outs = []
        for b in range(self.n_batches):
            y = self.run_batch(b, block)
            if keep:
                outs.append(y.to(self.engine.offload_device))
        return outs if keep else None

    @contextmanager
    def hooks(self, modules: dict[str, nn.Module], fn: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]):
        """Forward hooks ``fn(name, module, input, output)`` on ``modules`` for the duration."""
        handles = [
            m.register_forward_hook(lambda mod, inp, out, _n=n: fn(_n, mod, inp[0], out)) for n, m in modules.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


BlockCallback = Callable[[BlockContext], dict[str, Any] | None]


class LayerwiseEngine:
    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        device: torch.device | str | None = None,
        batch_size: int = 1,
        offload_device: torch.device | str = "cpu",
    ):
        self.model = model
        self.arch = get_arch(model)
        self.device = torch.device(device) if device is not None else _default_device()
        self.offload_device = torch.device(offload_device)
        self.capture = capture_layer_inputs(model, input_ids, self.device, batch_size, self.offload_device)

    @property
    def layers(self) -> nn.ModuleList:
        return get_submodule(self.model, self.arch.layers)

    def run(self, callback: BlockCallback, propagate: str = "compressed", desc: str = "calibrating") -> list[torch.Tensor]:
        """Visit every block; returns the last block's outputs (offload device)."""
        if propagate not in PROPAGATE_MODES:
            raise ValueError(f"propagate must be one of {PROPAGATE_MODES}, got {propagate!r}")
        inputs = fp_inputs = self.capture.hidden
        bar = tqdm(list(enumerate(self.layers)), desc=desc, unit="block", leave=False)
        for i, block in bar:
            start = time.perf_counter()
            home = next(block.parameters()).device
            block.to(self.device)
            ctx = BlockContext(self, i, block, inputs)
            if propagate == "original":
                ctx.fp_outputs = ctx.forward()
            elif propagate == "both":
                ctx.fp_inputs = fp_inputs
                with torch.no_grad():
                    ctx.fp_outputs = [ctx.run_batch(b, hidden=h).to(self.offload_device) for b, h in enumerate(fp_inputs)]
            stats = callback(ctx) or {}
            outputs = ctx.fp_outputs if propagate == "original" else ctx.forward()
            block.to(home)
            _check_finite(outputs, ctx.name, desc)
            inputs = outputs
            if propagate == "both":
                fp_inputs = ctx.fp_outputs
            elapsed = time.perf_counter() - start
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()}
            bar.set_postfix(block=i, s=f"{elapsed:.1f}", **shown)
            log.info("%s block %d/%d: %.2fs %s", desc, i + 1, len(self.layers), elapsed, shown or "")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return inputs


def _check_finite(outputs: list[torch.Tensor], name: str, desc: str):
    for t in outputs:
        if not torch.isfinite(t).all():
            raise FloatingPointError(
                f"NaN/inf in the outputs of {name} during {desc}. The method diverged at this layer: "
                "lower its learning rate, raise damping, or calibrate in float32."
            )


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    callback: BlockCallback,
    propagate: str = "compressed",
    device: torch.device | str | None = None,
    batch_size: int = 1,
    offload_device: torch.device | str = "cpu",
    desc: str = "calibrating",
) -> list[torch.Tensor]:
    """One-call form of :class:`LayerwiseEngine`: capture, then visit every block."""
    engine = LayerwiseEngine(model, input_ids, device, batch_size, offload_device)
    return engine.run(callback, propagate=propagate, desc=desc)


class _Injector(nn.Module):
    """Replaces a layer so the model's tail (final norm, head, softcapping) runs on given states."""

    def __init__(self, states: Iterator[torch.Tensor] | None):
        super().__init__()
        self.states = states

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.states is None else next(self.states)


@torch.no_grad()
def logits_from_hidden(model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Logits the model produces when its last decoder layer outputs ``hidden``: runs the model's
    own tail (final norm, lm_head, any logit softcapping) so no family-specific code is needed."""
    arch = get_arch(model)
    n = len(get_submodule(model, arch.layers))
    dev = next(get_submodule(model, arch.lm_head).parameters()).device
    last = _Injector(iter([hidden.to(dev)]))
    with _swapped_layers(model, arch, lambda i: last if i == n - 1 else _Injector(None)):
        return model(input_ids=input_ids.to(dev), use_cache=False).logits
