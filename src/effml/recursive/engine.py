"""Continuous depth-wise batching for recursive ("cycle") transformers, with optional early exit.

Layout. ``recursify(model, num_loops=J, strategy="cycle")`` leaves ``L = K * J`` depths where
depth ``d = j*K + k`` runs shared block ``k`` in loop ``j`` with its own LoRA and KV cache.

Step. A *row* is one request's current token at one loop: hidden state, position, loop ``j``.
An engine step runs each of the K shared blocks **once** over all rows; at block ``k`` a row at
loop ``j`` is depth ``j*K + k``, so it uses that depth's LoRA (gathered per row by the multi-LoRA
kernel, :mod:`effml.kernels.multi_lora`, on top of the shared weight computed once for the whole
batch) and that depth's KV cache. A decode token therefore takes J steps; after its last loop
the final norm + LM head give the next (greedy) token, which enters at loop 0 the next step.
Rows of different requests sit at different loops in the same block call, so a request never
waits for a "batch" to finish its loops: a slot that frees up is refilled at once.

Prefill. A newly admitted request runs its prompt once through all L depths (the real depth
modules, as ``model.forward`` would, batch of one, writing its own slot's KV for every depth),
at the start of the step that admits it; the last prompt position's logits give the first token
and the request joins depth-wise decoding in that same step. Prefill is not chunked or batched.

Continuous batching and memory. ``max_batch`` slots, each with ``max_tokens`` KV positions at
every depth, are allocated up front (``2 * L * max_batch * max_tokens * kv_heads * head_dim``
numbers), so a comparison "at equal memory" gives every system the same slots and positions.
A request needs ``len(prompt) + max_new_tokens <= max_tokens``. Finished requests free their
slot at the end of a step; the next step first admits queued requests (FIFO) into free slots.

Early exit (``early_exit=threshold``). After loop ``j < J-1`` a row's hidden state goes through
the final norm + LM head; if the top softmax probability is ``>= threshold`` the token is
emitted and the remaining loops are skipped. KV policy for the skipped depths ("copy from the
last computed loop"): for every block ``k`` and later loop ``j' > j``, the K/V entry of depth
``j'*K + k`` at that position is a copy of depth ``j*K + k``'s (same shared block, last loop
that ran). Later tokens attending at those depths thus see the exited token's shallower K/V,
computed with the loop-``j`` LoRA. The alternative (sharing loop-1 KV for *every* token, as
MoR's recursive KV sharing) would change the model even when nothing exits; the copy changes
only exited tokens and costs one K/V copy per skipped depth. The first token (from prefill)
never exits early. ``benchmarks/serving.py`` measures the effect on quality.

Exactness. With ``early_exit=None`` every token runs exactly the depths ``generate()`` runs, with
the same modules (block shells share parameter objects, see :mod:`.engine_blocks`), so greedy
outputs equal ``model.generate(do_sample=False)`` token for token; only float summation order
differs (batched, padded keys).

Supported: cycle recursive models and plain models (treated as one loop of L blocks: ordinary
continuous batching), eager or sdpa attention. ``sequence`` (each block repeated back to back)
and ``middle_cycle`` (unique first/last layers) have no loop that is one pass over the same
blocks and are rejected, as are other attention implementations. Greedy decoding only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.arch import ArchSpec, get_arch, get_submodule
from .engine_blocks import RowContext, block_shell
from .engine_cache import KVPool, RotaryTables, attention_bias, depth_types, depth_windows, pick_rows
from .uptrain import exit_logits

log = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class Request:
    """One generation request; the engine fills the outputs as it runs."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    forced: list[int] | None = None  # teacher forcing: feed these tokens instead of the greedy ones
    want_logprobs: bool = False
    tokens: list[int] = field(default_factory=list)  # generated (or forced) tokens
    predicted: list[int] = field(default_factory=list)  # argmax of the logits each token came from
    logprobs: list[float] = field(default_factory=list)  # log-prob of each token under those logits
    exit_loops: list[int] = field(default_factory=list)  # loop whose output gave each token (J-1 = full)
    finish_reason: str | None = None  # "eos" or "length"
    submit_step: int = 0
    admit_step: int = -1  # step whose prefill admitted it into a slot
    finish_step: int = -1
    submit_time: float = 0.0
    first_token_time: float = 0.0
    finish_time: float = 0.0


@dataclass
class EngineStats:
    steps: int = 0
    decode_rows: int = 0  # rows summed over steps (mean batch occupancy = decode_rows / steps)
    mixed_steps: int = 0  # steps whose rows were at more than one loop (the depth-wise batching case)
    prefills: int = 0
    prefill_tokens: int = 0
    tokens: int = 0
    exits: list[int] = field(default_factory=list)  # tokens emitted after each loop (prefill's: the last)
    kv_copies: int = 0  # (position, depth) K/V entries filled by the early-exit policy
    prefill_s: float = 0.0
    blocks_s: float = 0.0  # the K shared-block calls of decode steps
    heads_s: float = 0.0  # final norm + LM head (exit checks included), sampling, bookkeeping

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_rows_per_step"] = self.decode_rows / max(self.steps, 1)
        return d


class Engine:
    """Continuous depth-wise batching server for a recursive (cycle) or plain causal LM.

    ``submit`` queues a request and returns its id; ``step`` runs one engine step and returns the
    requests that finished in it; ``run`` steps until everything submitted is done, yielding
    finished requests. See the module docstring for the scheduling and early-exit policy.

    ``max_batch``: slots (requests decoded at once); ``max_tokens``: KV positions per slot (prompt
    + new tokens of one request); ``early_exit``: ``None`` or a confidence threshold in [0, 1];
    ``eos_token_id``: ``"model"`` (the generation config's), ids, or ``None`` to never stop early;
    ``lora_backend``: how rows at different loops get their LoRAs (``"auto"``: the Triton kernel on
    CUDA, the concatenated-LoRA torch path elsewhere; or ``"triton"``, ``"concat"``, ``"torch"``).
    The LoRA factors are copied when the engine is built: build a new engine after training.
    """

    def __init__(self, model: nn.Module, max_batch: int = 8, max_tokens: int = 512, early_exit: float | None = None,
                 eos_token_id: int | Sequence[int] | None | str = "model", lora_backend: str = "auto"):
        for name, v in (("max_batch", max_batch), ("max_tokens", max_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if model.training:
            raise ValueError("the engine serves a model in eval mode; call model.eval() first")
        config = model.config
        impl = getattr(config, "_attn_implementation", "eager")
        if impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {impl!r} is not supported by the engine (it passes padded "
                             f"per-row masks); load the model with attn_implementation in {ATTENTION_IMPLEMENTATIONS}")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional-attention models cannot be decoded token by token")
        arch = get_arch(model)
        self.model = model
        self.layers = get_submodule(model, arch.layers)
        self.num_depths = len(self.layers)
        self.num_blocks, self.num_loops = _loop_layout(model, self.num_depths)
        self.early_exit = _check_threshold(early_exit, self.num_loops)
        self.max_batch, self.max_tokens = max_batch, max_tokens

        self.ctx = RowContext()
        if self.num_loops == 1:
            self.blocks = list(self.layers)
        else:
            self.blocks = [block_shell(self.layers, k, self.num_blocks, self.num_loops, self.ctx, lora_backend,
                                       shared=(config,)) for k in range(self.num_blocks)]
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        heads = ArchSpec.heads(config)
        self.pool = KVPool(self.num_depths, max_batch, max_tokens, heads.n_kv_heads, heads.head_dim, self.dtype,
                           self.device)
        self.embed = get_submodule(model, arch.embed)
        self.vocab_size = self.embed.weight.shape[0]
        self.rotary = RotaryTables(get_submodule(model, arch.rotary) if arch.rotary else None)
        self.windows = depth_windows(config, self.num_depths)
        self.types = depth_types(config, self.num_depths)
        self._win_keys, self._win_of_loop = self._per_block(self.windows)
        self._type_keys, self._type_of_loop = self._per_block(self.types)
        self.eos = _eos_set(model, eos_token_id)

        self.slot_req: list[Request | None] = [None] * max_batch
        self.hidden = torch.zeros(max_batch, heads.hidden, dtype=self.dtype, device=self.device)
        self.loop = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.queue: deque[Request] = deque()
        self.stats = EngineStats(exits=[0] * self.num_loops)
        self._next_id = 0
        log.info("engine: %d depths = %d blocks x %d loops, %d slots x %d positions, KV pool %.1f MiB, early exit %s",
                 self.num_depths, self.num_blocks, self.num_loops, max_batch, max_tokens, self.pool.nbytes / 2**20,
                 self.early_exit)

    # --- public API ------------------------------------------------------------------------------
    def submit(self, prompt_ids, max_new_tokens: int, forced=None, logprobs: bool = False) -> int:
        """Queue a request; returns its id. ``prompt_ids``: token ids (list, 1-D tensor or
        ``[1, T]`` tensor). ``forced``: optional continuation fed instead of the greedy tokens
        (teacher forcing, for measuring log-probs); implies ``logprobs``."""
        ids = _id_list(prompt_ids, "prompt_ids")
        if not ids:
            raise ValueError("prompt_ids is empty; a request needs at least one prompt token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        forced_ids = None
        if forced is not None:
            forced_ids = _id_list(forced, "forced")
            if len(forced_ids) < max_new_tokens:
                raise ValueError(f"forced has {len(forced_ids)} tokens, fewer than max_new_tokens={max_new_tokens}")
        for name, seq in (("prompt_ids", ids), ("forced", forced_ids or [])):
            bad = [t for t in seq if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name} has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        need = len(ids) + max_new_tokens
        if need > self.max_tokens:
            raise ValueError(f"the request needs {need} KV positions (prompt {len(ids)} + {max_new_tokens} new) but "
                             f"slots hold max_tokens={self.max_tokens}; shorten it or build the Engine with a larger "
                             "max_tokens")
        req = Request(self._next_id, ids, max_new_tokens, forced_ids, logprobs or forced_ids is not None,
                      submit_step=self.stats.steps, submit_time=time.perf_counter())
        self._next_id += 1
        self.queue.append(req)
        return req.id

    @property
    def busy(self) -> bool:
        """Whether anything is queued or in flight."""
        return bool(self.queue) or self.active > 0

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return sum(r is not None for r in self.slot_req)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit queued requests into free slots (prefill), then run every shared block once over
        all rows. Returns the requests that finished during this step."""
        finished: list[Request] = []
        t0 = time.perf_counter()
        self._admit(finished)
        t1 = time.perf_counter()
        self.stats.prefill_s += t1 - t0
        if self.active:
            self._decode(finished)
        self.stats.steps += 1
        return finished

    def run(self) -> Iterator[Request]:
        """Step until every submitted request has finished, yielding each as it finishes."""
        while self.busy:
            yield from self.step()

    # --- scheduling -------------------------------------------------------------------------------
    def _admit(self, finished: list[Request]) -> None:
        while self.queue:
            free = [s for s, r in enumerate(self.slot_req) if r is None]
            if not free:
                return
            self._prefill(self.queue.popleft(), free[0], finished)

    def _prefill(self, req: Request, slot: int, finished: list[Request]) -> None:
        """The prompt through all L depths (the real depth modules, batch of one) into ``slot``."""
        n = len(req.prompt)
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        h = self.embed(ids)
        pos_ids = torch.arange(n, device=self.device)[None]
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        masks = {w: attention_bias(zero, n, n, w, h.dtype) for w in set(self.windows)}
        rope = {t: self.rotary(h, pos_ids, t) for t in set(self.types)}
        self.pool.bind(torch.tensor([slot], device=self.device), zero, n, zero)
        for d, layer in enumerate(self.layers):
            h = _call_layer(layer, h, masks[self.windows[d]], rope[self.types[d]], pos_ids, self.pool)
        logits = exit_logits(self.model, h[:, -1:])[:, -1]
        self.stats.prefills += 1
        self.stats.prefill_tokens += n
        req.admit_step = self.stats.steps
        self.slot_req[slot] = req
        self.pos[slot] = n - 1  # the row "at" the last prompt token; _emit moves it to the first new one
        self._emit([slot], logits, [self.num_loops - 1], finished)

    def _decode(self, finished: list[Request]) -> None:
        t0 = time.perf_counter()
        slots = [s for s, r in enumerate(self.slot_req) if r is not None]
        idx = torch.tensor(slots, device=self.device)
        loops, pos = self.loop[idx], self.pos[idx]
        h = self.hidden[idx][:, None]
        length = int(pos.max()) + 1
        pos_ids = pos[:, None]
        masks = {w: attention_bias(pos, 1, length, w, h.dtype) for w in set(self.windows)}
        rope = {t: self.rotary(h, pos_ids, t) for t in set(self.types)}
        loop_list = loops.tolist()
        single = loop_list[0] if len(set(loop_list)) == 1 else None
        self.stats.mixed_steps += single is None
        self.ctx.set(loops, single)
        self.pool.bind(idx, pos, length, loops * self.num_blocks)
        for k, block in enumerate(self.blocks):
            mask = pick_rows(masks, self._win_keys[k], self._rows_key(self._win_of_loop[k], loops))
            pe = pick_rows(rope, self._type_keys[k], self._rows_key(self._type_of_loop[k], loops))
            h = _call_layer(block, h, mask, pe, pos_ids, self.pool)
        h = h[:, 0]
        t1 = time.perf_counter()
        self.stats.blocks_s += t1 - t0
        self.stats.decode_rows += len(slots)

        last = self.num_loops - 1
        if self.early_exit is None:
            head = [i for i, j in enumerate(loop_list) if j == last]
        else:
            head = list(range(len(slots)))
        emit_rows: list[int] = []
        logits = None
        if head:
            logits = exit_logits(self.model, h[head][:, None])[:, 0]
            if self.early_exit is None:
                emit_rows = head
            else:
                conf = torch.softmax(logits.float(), dim=-1).amax(-1).tolist()
                emit_rows = [i for i, c in zip(head, conf) if loop_list[i] == last or c >= self.early_exit]
                logits = logits[[head.index(i) for i in emit_rows]]
        emitted = set(emit_rows)
        stay = [i for i in range(len(slots)) if i not in emitted]
        if stay:  # not done with this token: next loop, same hidden state
            s = idx[stay]
            self.hidden[s] = h[stay]
            self.loop[s] += 1
        if emit_rows:
            self._emit([slots[i] for i in emit_rows], logits, [loop_list[i] for i in emit_rows], finished)
        self.stats.heads_s += time.perf_counter() - t1

    def _emit(self, slots: list[int], logits: torch.Tensor, loops: list[int], finished: list[Request]) -> None:
        """Append one token per slot from ``logits`` (``[len(slots), vocab]``), finish requests that
        are done, fill early-exit KV, and start the rest on their next token at loop 0."""
        now = time.perf_counter()
        greedy = logits.argmax(-1).tolist()
        reqs = [self.slot_req[s] for s in slots]
        logp = torch.log_softmax(logits.float(), -1) if any(r.want_logprobs for r in reqs) else None
        go_on: list[int] = []
        tokens: list[int] = []
        for i, (slot, req, j) in enumerate(zip(slots, reqs, loops)):
            n = len(req.tokens)
            tok = req.forced[n] if req.forced is not None else greedy[i]
            req.tokens.append(tok)
            req.predicted.append(greedy[i])
            req.exit_loops.append(j)
            if logp is not None:
                req.logprobs.append(float(logp[i, tok]))
            if n == 0:
                req.first_token_time = now
            self.stats.tokens += 1
            self.stats.exits[j] += 1
            reason = None
            if n + 1 >= req.max_new_tokens:
                reason = "length"
            elif req.forced is None and tok in self.eos:
                reason = "eos"
            if reason is not None:
                req.finish_reason, req.finish_step, req.finish_time = reason, self.stats.steps, now
                self.slot_req[slot] = None
                finished.append(req)
                continue
            if j < self.num_loops - 1:
                self._fill_skipped(slot, j)
            go_on.append(slot)
            tokens.append(tok)
        if go_on:
            s = torch.tensor(go_on, device=self.device)
            self.hidden[s] = self.embed(torch.tensor(tokens, device=self.device))
            self.loop[s] = 0
            self.pos[s] += 1

    def _fill_skipped(self, slot: int, loop: int) -> None:
        """Early-exit KV policy: the skipped depths of this position copy the last computed loop's."""
        K = self.num_blocks
        src = [loop * K + k for _ in range(loop + 1, self.num_loops) for k in range(K)]
        dst = [j * K + k for j in range(loop + 1, self.num_loops) for k in range(K)]
        s = torch.tensor([slot], device=self.device)
        self.pool.copy_position(s, self.pos[s], torch.tensor([src], device=self.device),
                                torch.tensor([dst], device=self.device))
        self.stats.kv_copies += len(dst)

    # --- helpers -----------------------------------------------------------------------------------
    def _per_block(self, per_depth: list) -> tuple[list[list], list[torch.Tensor | None]]:
        """Per block: the distinct values of its depths, and each loop's index into them (``None``
        when every loop has the same value, the common case)."""
        keys, of_loop = [], []
        for k in range(self.num_blocks):
            vals = [per_depth[j * self.num_blocks + k] for j in range(self.num_loops)]
            uniq = list(dict.fromkeys(vals))
            keys.append(uniq)
            of_loop.append(None if len(uniq) == 1 else
                           torch.tensor([uniq.index(v) for v in vals], dtype=torch.long, device=self.device))
        return keys, of_loop

    @staticmethod
    def _rows_key(of_loop: torch.Tensor | None, loops: torch.Tensor) -> torch.Tensor | None:
        return None if of_loop is None else of_loop[loops]


def _call_layer(layer: nn.Module, h, mask, position_embeddings, position_ids, cache):
    out = layer(h, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                cache=cache)
    return out[0] if isinstance(out, tuple) else out


def _loop_layout(model: nn.Module, num_layers: int) -> tuple[int, int]:
    """(K blocks, J loops): from ``model.effml_recursive`` for a recursive model, (L, 1) otherwise."""
    rec = getattr(model, "effml_recursive", None)
    if rec is None:
        return num_layers, 1
    strategy = rec["config"]["strategy"]
    if strategy != "cycle":
        raise ValueError(
            f"the engine batches the loops of a 'cycle' recursive model, but this model uses strategy {strategy!r}: "
            "'sequence' repeats each layer back to back and 'middle_cycle' keeps unique first/last layers, so no loop "
            "is one pass over the same shared blocks. Supported: recursify(..., strategy='cycle'), or a plain model.")
    loops = rec["config"]["num_loops"]
    groups = rec["layout"]["groups"]
    k = len(groups)
    if k * loops != num_layers or groups != [[i + j * k for j in range(loops)] for i in range(k)]:
        raise ValueError(f"the recorded layout {groups} is not a cycle of {k} blocks x {loops} loops over "
                         f"{num_layers} layers; re-run recursify on the original model")
    return k, loops


def _check_threshold(early_exit, num_loops: int) -> float | None:
    if early_exit is None:
        return None
    if isinstance(early_exit, bool) or not isinstance(early_exit, (int, float)) or not 0 <= early_exit <= 1:
        raise ValueError(f"early_exit must be None or a confidence threshold in [0, 1], got {early_exit!r}")
    if num_loops < 2:
        raise ValueError("early_exit needs a recursive model with num_loops >= 2 (exits are at loop boundaries)")
    return float(early_exit)


def _eos_set(model, eos_token_id) -> set[int]:
    if isinstance(eos_token_id, str):
        if eos_token_id != "model":
            raise ValueError(f"eos_token_id must be an int, a list of ints, None or 'model', got {eos_token_id!r}")
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _id_list(ids, name: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor or a [1, T] one, got {ids.dtype} {tuple(ids.shape)}")
        return [int(t) for t in ids.tolist()]
    out = list(ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in out):
        raise ValueError(f"{name} must hold ints (token ids)")
    return out
