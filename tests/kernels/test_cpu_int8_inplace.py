"""8-bit symmetric per-channel QuantLinears run the CPU int8 kernels on ``qweight`` itself (an
int8 view, no second [N, K] copy): the stored byte layout, exact accumulators, shared storage,
resident bytes of a W8A8 model."""

import pytest
import torch
import torch.nn as nn
from effml.kernels import cpu_int8, cpu_weight_only_dtype, dispatch, use_kernels
from kernel_helpers import KS, MS, NS, activations

import effml
from effml.quant.act import ActQuantizer
from effml.quant.qlinear import QuantLinear
from effml.quant.quantizers import pack_codes, unpack_codes
from effml.testing import random_ids, tiny_model

U32 = 2.0**-24


def _layer(k, n, w_bits, a_bits, w_sym=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    q = QuantLinear.from_linear(lin)
    q.set_quantized_weight(lin.weight.detach(), w_bits, w_sym, None)
    if a_bits < 16:
        q.act_quant = ActQuantizer(a_bits, sym=True)
    return q


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 13), generator=g, dtype=torch.uint8)  # odd count
    codes.view(-1)[:2] = torch.tensor([0, 2**bits - 1], dtype=torch.uint8)  # both ends of the range
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == ((91 + 1) // 2 if bits <= 4 else 91)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)
    if bits == 8:  # stored bytes read as int8 are the symmetric codes q = code - 128
        assert torch.equal(packed.view(torch.int8).long(), codes.reshape(-1).long() - 128)
    elif bits > 4:  # 5..7 bits: one code per byte, unchanged
        assert torch.equal(packed, codes.reshape(-1))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_w8a8_int_mm_on_qweight_view_is_exact(m, k, n):
    q = _layer(k, n, 8, 8, seed=m + k + n)
    x = activations(m, k, seed=n)
    stored = q.qweight.clone()
    with torch.no_grad():
        with use_kernels("torch"):
            ref = q(x).double()
            xq = q.prepare_input(x).double()
        dispatch.calls.clear()
        y = q(x).double()
    assert dispatch.calls["cpu_intmm"] == 1
    w8 = q._kernel_cache["w8"]
    # the kernel's weight is qweight in place: same storage, int8 [N, K], no copy
    assert w8.dtype == torch.int8 and w8.shape == (n, k) and _storage(w8) == _storage(q.qweight)
    ref_codes_w = unpack_codes(q.qweight, 8, (n, k)).long() - 128
    assert torch.equal(w8.long(), ref_codes_w)
    codes_a, _ = cpu_int8.quantize_rows(x, 8, 1.0)
    acc = cpu_int8.int_mm(codes_a, w8.t())
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), codes_a.long() @ ref_codes_w.T)
    bound = (k + 4) * U32 * (xq.abs() @ q.dequantized_weight().double().abs().T)
    assert ((y - ref).abs() <= bound + 1e-6).all()
    assert torch.equal(q.qweight, stored)  # the kernels only read the view


@pytest.mark.parametrize("m", MS)
def test_w8a16_weight_only_on_qweight_view(m):
    q = _layer(576, 192, 8, 16, seed=m)
    x = activations(m, 576, seed=m)
    with torch.no_grad():
        with use_kernels("torch"):
            ref = q(x).double()
        dispatch.calls.clear()
        with cpu_weight_only_dtype(torch.float32):
            y = q(x).double()
    assert dispatch.calls["cpu_int8w"] == 1
    assert _storage(q._kernel_cache["w8"]) == _storage(q.qweight)
    exact = x.double().abs() @ q.dequantized_weight().double().abs().T
    assert ((y - ref).abs() <= 2 * 576 * U32 * exact + 1e-6).all()


def _big_cache_tensors(q):
    """Kernel-cache tensors of at least N * K elements that are not qweight's storage."""
    n_k = q.in_features * q.out_features
    return [v for v in q._kernel_cache.values()
            if isinstance(v, torch.Tensor) and v.numel() >= n_k and _storage(v) != _storage(q.qweight)]


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (8, 16)])
def test_no_second_weight_copy_for_eight_bit_symmetric(w_bits, a_bits):
    q = _layer(576, 192, w_bits, a_bits)
    assert effml.kernels.prepare(q) == 1
    assert _big_cache_tensors(q) == []
    small = 192 * 4 + 192 * 2  # float32 kernel scales, float16 stored scales (+ bias below)
    assert dispatch.resident_bytes(q) <= q.qweight.numel() + small + 2 * 192 * 4


@pytest.mark.parametrize("w_bits,w_sym", [(6, True), (7, False)])
def test_narrower_codes_keep_their_int8_copy(w_bits, w_sym):
    q = _layer(576, 192, w_bits, 8, w_sym)
    effml.kernels.prepare(q)
    (copy,) = _big_cache_tensors(q)  # documented: 5..7-bit codes are not int8 in place
    zp = 2 ** (w_bits - 1) if w_sym else q.zeros.long()
    assert torch.equal(copy.long(), unpack_codes(q.qweight, w_bits, (192, 576)).long() - zp)


def test_view_is_dropped_with_the_cache_on_move_or_cast():
    q = _layer(576, 192, 8, 8)
    effml.kernels.prepare(q)
    old = q._kernel_cache["w8"]
    q.to(torch.float32)
    assert "_kernel_cache" not in q.__dict__
    with torch.no_grad():
        q(torch.randn(2, 576))
    assert _storage(q._kernel_cache["w8"]) == _storage(q.qweight) and q._kernel_cache["w8"] is not old


def test_w8a8_model_quantized_linears_fit_in_thirty_percent():
    model = effml.quantize(tiny_model("llama"), "rtn", w_bits=8, a_bits=8)
    with torch.no_grad():
        dispatch.calls.clear()
        model(random_ids(model, n=1, seq_len=8))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight is None]
    assert layers and dispatch.calls["cpu_intmm"] == len(layers) and dispatch.calls["torch"] == 0
    seen, resident, fp32 = set(), 0, 0
    for m in layers:
        fp32 += 4 * m.in_features * m.out_features
        tensors = [m._buffers.get(b) for b in ("qweight", "scales", "zeros")] + list(m._kernel_cache.values())
        for t in tensors:
            if isinstance(t, torch.Tensor) and _storage(t) not in seen:
                seen.add(_storage(t))
                resident += t.untyped_storage().nbytes()
    assert resident <= 0.30 * fp32, resident / fp32


@pytest.mark.parametrize("a_bits,path", [(16, "cpu_int8w"), (8, "cpu_intmm")])
def test_misaligned_qweight_is_realigned_in_place(a_bits, path):
    """safetensors loads tensors 8-byte aligned; the bfloat16 int8-pack kernel crashes on that."""
    q = _layer(576, 192, 8, a_bits)
    other = _layer(576, 192, 8, a_bits, seed=1)
    buf = torch.empty(q.qweight.numel() + cpu_int8.ALIGN, dtype=torch.uint8)
    start = (cpu_int8.ALIGN - buf.data_ptr() % cpu_int8.ALIGN) % cpu_int8.ALIGN + 8
    buf[start:start + q.qweight.numel()] = q.qweight
    shared = buf[start:start + q.qweight.numel()]
    assert shared.data_ptr() % cpu_int8.ALIGN == 8
    q._buffers["qweight"] = other._buffers["qweight"] = shared  # one buffer, two modules
    x = activations(7, 576)
    with torch.inference_mode():
        with use_kernels("torch"):
            ref = q(x)
        dispatch.calls.clear()
        y = q(x)
        cache = q._kernel_cache
        q(x)
    assert dispatch.calls[path] == 2 and q._kernel_cache is cache  # realigned once, then reused
    assert q.qweight is shared and other.qweight is shared  # same tensor object, still shared
    assert shared.data_ptr() % cpu_int8.ALIGN == 0 and _storage(cache["w8"]) == _storage(shared)
    assert torch.equal(shared, buf[start:start + shared.numel()])  # same bytes
    assert ((y - ref).abs() <= 0.02 * ref.abs().max()).all()
