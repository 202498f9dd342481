"""Multi-LoRA (per-row depth gather, shrink then expand): Triton kernel under the interpreter and
the torch reference, both against a float64 row-by-row oracle; and the engine on the kernel."""

import importlib
import os
import sys

import pytest
import torch
from effml.kernels.multi_lora import _tiles, multi_lora, multi_lora_reference

# Triton picks interpreter or compiler when a kernel is decorated. As tests/kernels/conftest.py
# does for the quantization kernels: (re)import ours with TRITON_INTERPRET=1, then restore it.
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from effml.kernels import launch

    _kernels = importlib.import_module("effml.kernels._multi_lora_triton")
    if not launch.interpreted(_kernels.shrink_kernel):
        _kernels = importlib.reload(sys.modules["effml.kernels._multi_lora_triton"])
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous
INTERPRETED = launch.interpreted(_kernels.shrink_kernel)
triton_ok = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                               reason="the kernels were not imported under the interpreter and there is no GPU")


def oracle(x, A, B, idx, scale, base):
    """Row by row in float64: the definition, with no grouping or tiling."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64) if base is None else base.double().clone()
    for i, d in enumerate(idx.tolist()):
        if d >= 0:
            out[i] += scale * (B[d].double() @ (A[d].double() @ x[i].double()))
    return out


def case(n, d_in, d_out, r, D, seed, dtype=torch.float32, with_base=True, idx=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    A = (torch.randn(D, r, d_in, generator=g) / d_in**0.5).to(dtype)
    B = torch.randn(D, d_out, r, generator=g).to(dtype)
    if idx is None:
        idx = torch.randint(-1, D, (n,), generator=g)
    base = torch.randn(n, d_out, generator=g).to(dtype) if with_base else None
    return x, A, B, idx, base


# odd sizes (nothing a multiple of 16), a depth with more rows than one tile, unused depths, no-LoRA rows
SHAPES = [
    dict(n=1, d_in=5, d_out=3, r=1, D=1),
    dict(n=7, d_in=37, d_out=53, r=5, D=3),
    dict(n=37, d_in=130, d_out=67, r=17, D=6),
    dict(n=50, d_in=24, d_out=200, r=80, D=2),  # rank above one rank block (64)
]


@triton_ok
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s.values())))
@pytest.mark.parametrize("with_base", [True, False])
def test_triton_matches_oracle_fp32(shape, with_base):
    x, A, B, idx, base = case(**shape, seed=sum(shape.values()), with_base=with_base)
    want = oracle(x, A, B, idx, 0.5, base)
    got = multi_lora(x, A, B, idx, scale=0.5, base=base, backend="triton")
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for torch_backend in ("torch", "concat"):
        ref = multi_lora(x, A, B, idx, scale=0.5, base=base, backend=torch_backend)
        torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-5)
    if base is not None:  # rows without a LoRA are the base, untouched
        keep = idx < 0
        assert torch.equal(got[keep], base[keep])


@triton_ok
def test_triton_fp16_and_strided_input():
    x, A, B, idx, base = case(n=23, d_in=45, d_out=29, r=6, D=4, seed=3, dtype=torch.float16)
    buf = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    buf[:, ::2] = x
    xs = buf[:, ::2]  # column stride 2, row stride 2 * in
    assert not xs.is_contiguous() and torch.equal(xs, x)
    want = oracle(x, A, B, idx, 1.0, base)
    got = multi_lora(xs, A, B, idx, base=base, backend="triton")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@triton_ok
def test_triton_one_depth_many_tiles_and_all_depths_mixed():
    # 40 rows on one depth = 3 tiles; then every depth interleaved
    for idx in (torch.full((40,), 2), torch.arange(40) % 5):
        x, A, B, _, base = case(n=40, d_in=19, d_out=21, r=3, D=5, seed=7, idx=idx)
        got = multi_lora(x, A, B, idx, scale=2.0, base=base, backend="triton")
        torch.testing.assert_close(got.double(), oracle(x, A, B, idx, 2.0, base), rtol=1e-5, atol=1e-5)


def test_tile_table_covers_each_row_once():
    idx = torch.tensor([3, -1, 0, 3, 3, 0, -1, 2] * 5)
    order, depth, start, length, num_tiles = _tiles(idx, 4, 4)
    seen = []
    for t in range(num_tiles):
        rows = order[start[t]: start[t] + length[t]].tolist()
        assert all(idx[i] == depth[t] for i in rows)
        seen += rows
    assert sorted(seen) == sorted(i for i in range(len(idx)) if idx[i] >= 0)
    assert num_tiles >= sum(-(-int((idx == d).sum()) // 4) for d in range(4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_backends_match_oracle_without_triton(seed):
    """The CPU paths on their own (they run even where the Triton tests are skipped)."""
    x, A, B, idx, base = case(n=29, d_in=41, d_out=13, r=7, D=4, seed=seed)
    want = oracle(x, A, B, idx, 1.5, base)
    for backend in ("torch", "concat"):
        torch.testing.assert_close(multi_lora(x, A, B, idx, scale=1.5, base=base, backend=backend).double(), want,
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(multi_lora(x, A, B, idx, base=base, backend="auto"),
                       multi_lora(x, A, B, idx, base=base, backend="concat"))  # CPU default


def test_reference_single_depth_equals_depth_lora_arithmetic():
    x, A, B, _, base = case(n=6, d_in=11, d_out=9, r=4, D=3, seed=1)
    idx = torch.full((6,), 1)
    want = base + torch.nn.functional.linear(torch.nn.functional.linear(x, A[1]), B[1])
    assert torch.equal(multi_lora_reference(x, A, B, idx, base=base), want)


def test_bad_input_is_rejected():
    x, A, B, idx, base = case(n=4, d_in=8, d_out=6, r=2, D=3, seed=0)
    with pytest.raises(ValueError, match="depth_idx values"):
        multi_lora(x, A, B, torch.tensor([0, 1, 3, 0]), backend="torch")
    with pytest.raises(ValueError, match="do not chain"):
        multi_lora(x, A[:, :, :5], B, idx, backend="torch")
    with pytest.raises(ValueError, match="share a dtype"):
        multi_lora(x.double(), A, B, idx, backend="torch")
    with pytest.raises(ValueError, match="base must be"):
        multi_lora(x, A, B, idx, base=base[:, :3], backend="torch")
    with pytest.raises(ValueError, match="backend"):
        multi_lora(x, A, B, idx, backend="cuda")


@triton_ok
def test_engine_on_the_triton_kernel_equals_generate():
    """The engine's block shells with the interpreted kernel for mixed-loop batches."""
    from effml.recursive import Engine, recursify
    from effml.testing import tiny_model

    model = recursify(tiny_model("qwen2", num_hidden_layers=2), num_loops=2, init="average", lora_rank=3)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, 256, (n,), generator=g) for n in (5, 3, 8)]
    news, arrivals = (5, 4, 4), (0, 1, 3)
    want = [model.generate(p[None], max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):]
            .tolist() for p, n in zip(ps, news)]
    engine = Engine(model, max_batch=3, max_tokens=16, eos_token_id=None, lora_backend="triton")
    done, step = {}, 0
    while len(done) < len(ps):
        for i, a in enumerate(arrivals):
            if a == step:
                engine.submit(ps[i], news[i])
        done.update({r.id: r.tokens for r in engine.step()})
        step += 1
    assert [done[i] for i in range(len(ps))] == want
    assert engine.stats.mixed_steps > 0  # the kernel ran on rows at different loops
