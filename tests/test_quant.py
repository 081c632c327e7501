"""The quantized base: round-trip error within its bound, forward/backward == the dequantized
weight in float, and packed tensors checked on arrival."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lte_fed import quant
from lte_fed.lora import LoRALinear
from lte_fed.rng import torch_generator

# Relative Frobenius error of a Gaussian W, measured: nf4 0.092, fp4 0.123, int8 0.0067 (the
# double-quantized 4-bit formats within 0.1% of their plain ones).
EXPECTED_REL_ERROR = {"nf4": 0.11, "fp4": 0.15, "nf4-dq": 0.11, "fp4-dq": 0.15, "int8": 0.01}


@pytest.mark.parametrize("fmt", sorted(EXPECTED_REL_ERROR))
@pytest.mark.parametrize("shape", [(64, 128), (30, 50)])  # 1500 entries: a partial last 4-bit block
def test_round_trip_error_within_bound(fmt, shape):
    w = torch.randn(shape, generator=torch_generator(30))
    w[0, :5] *= 20  # an outlier: the bound must scale with its block / row
    deq = quant.dequantize(quant.quantize(w, fmt), fmt, shape)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    err = (deq - w).abs()
    bound = quant.error_bound(w, fmt)
    assert (err <= bound).all(), float((err - bound).max())
    w_plain = torch.randn(shape, generator=torch_generator(31))
    deq = quant.dequantize(quant.quantize(w_plain, fmt), fmt, shape)
    rel = float((deq - w_plain).norm() / w_plain.norm())
    assert 0 < rel < EXPECTED_REL_ERROR[fmt], rel


def test_none_is_lossless():
    w = torch.randn(8, 16, generator=torch_generator(32))
    assert torch.equal(quant.dequantize(quant.quantize(w, "none"), "none", (8, 16)), w)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "nf4-dq", "int8"])
def test_quantized_head_matches_float_with_dequantized_weight(fmt):
    g = torch_generator(33)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(32, generator=g))
    layer = LoRALinear(lin, 4, 8.0, variant="reset", quant=fmt, generator=g)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(32, 4, generator=g) * 0.1)
    deq = layer.base.dequantize()
    assert (deq - lin.weight).abs().max() > 0  # really quantized

    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    gout = torch.randn(3, 5, 32, generator=g)
    (layer(x) * gout).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    ref = F.linear(x_ref, deq) + layer.scale * (x_ref @ A.T) @ B.T + layer.bias.detach()
    (ref * gout).sum().backward()
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().max() > 0


def test_set_parts_rejects_wrong_shape_dtype_or_missing():
    q = quant.QuantizedWeight.from_weight(torch.randn(16, 64, generator=torch_generator(34)), "nf4")
    good = {k: v.clone() for k, v in q.parts().items()}
    with pytest.raises(ValueError, match="'packed'.*expected"):
        q.set_parts({**good, "packed": good["packed"][:-1]})
    with pytest.raises(ValueError, match="'absmax'.*float64"):
        q.set_parts({**good, "absmax": good["absmax"].double()})
    with pytest.raises(ValueError, match="missing 'absmax'"):
        q.set_parts({"packed": good["packed"]})
    with pytest.raises(ValueError, match="shape"):
        q.set_weight(torch.zeros(16, 32))
    q.set_parts(good)  # the right parts load
    assert torch.equal(q.parts()["packed"], good["packed"])


def test_double_quantization_keeps_the_codes_and_moves_only_the_block_scales():
    w = torch.randn(96, 200, generator=torch_generator(35))
    plain, dq = quant.quantize(w, "nf4"), quant.quantize(w, "nf4-dq")
    assert torch.equal(plain["packed"], dq["packed"]) and dq["absmax"].dtype == torch.uint8
    a, b = quant.dequantize(plain, "nf4", w.shape), quant.dequantize(dq, "nf4-dq", w.shape)
    assert 0 < float((a - b).abs().max()) < 0.01 * float(w.abs().max())
    q = quant.QuantizedWeight.from_weight(w, "nf4-dq")
    assert {k: (v.shape, v.dtype) for k, v in q.parts().items()} == {k: (v.shape, v.dtype) for k, v in dq.items()}
    torch.testing.assert_close(q.dequantize(), b, rtol=0, atol=0)
    bnbf = quant._bnb()  # what bitsandbytes' own nested state dequantizes to, exactly
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    assert torch.equal(bnbf.dequantize_4bit(packed, state), b)
    with pytest.raises(ValueError, match="'absmax'.*float32"):
        q.set_parts({**dq, "absmax": plain["absmax"]})  # a plain nf4 record sent to a -dq worker


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "nf4-dq", "fp4-dq", "int8"])
@pytest.mark.parametrize("shape", [(96, 200), (30, 50), (7, 33), (1, 1), (3, 600)])  # partial blocks, odd sizes
def test_dequantizing_without_bitsandbytes_gives_what_bitsandbytes_gives(fmt, shape):
    """A worker dequantizes in plain torch (no bitsandbytes import): the same float32 values as
    bitsandbytes' own kernels, bit for bit (up to the sign of a zero: bitsandbytes' CPU kernel
    decodes fp4's code 8 as -0, its fallback for an odd row length as +0)."""
    w = torch.randn(shape, generator=torch_generator(36))
    w.view(-1)[0] *= 40  # an outlier block
    w.view(-1)[-1] = 0.0
    bnbf = quant._bnb()
    parts = quant.quantize(w, fmt)
    got = quant.dequantize(parts, fmt, shape)
    if fmt == "int8":
        want = bnbf.int8_vectorwise_dequant(parts["packed"], parts["absmax"])
    else:
        packed, state = bnbf.quantize_4bit(w, quant_type=fmt[:3], blocksize=quant.BLOCKSIZE_4BIT,
                                           compress_statistics=fmt.endswith("-dq"))
        want = bnbf.dequantize_4bit(packed, state)
    assert got.dtype == torch.float32 and got.shape == shape and got.is_contiguous()
    assert torch.equal(got, want)
    if not fmt.startswith("fp4") or shape[1] % 2 == 0:
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "nf4-dq", "fp4-dq"])
@pytest.mark.parametrize("shape", [(96, 200), (7, 33), (1, 1), (3, 600), (1, 63)])  # partial blocks, odd sizes
def test_quantizing_gives_bitsandbytes_own_bytes(fmt, shape):
    """`quantize_4bit` is ours (faster than bitsandbytes' binary search): the same packed codes
    and scales as bitsandbytes' quantize_4bit, byte for byte, including entries that sit exactly
    on a midpoint between two code values, zeros, a block of zeros and infinitesimal blocks."""
    kind, double = quant.four_bit(fmt)
    w = torch.randn(shape, generator=torch_generator(37))
    flat = w.view(-1)
    flat[0] *= 40  # an outlier block
    if flat.numel() >= 128:
        flat[:64] = 0.0  # a block of zeros
        flat[64:128].clamp_(-0.9, 0.9)[0] = 1.0  # every midpoint exactly, in a block whose absmax is 1
        mids = quant._code_bounds(kind, torch.device("cpu"))[0]
        flat[65:65 + len(mids)] = torch.stack(mids)[: flat.numel() - 65]
        flat[96:100] = torch.tensor([1e-40, -1e-40, 0.0, -0.0])
    flat[-1] = 0.0
    bnbf = quant._bnb()
    parts = quant.quantize(w, fmt)
    packed, state = bnbf.quantize_4bit(w, quant_type=kind, blocksize=quant.BLOCKSIZE_4BIT, compress_statistics=double)
    assert torch.equal(parts["packed"], packed)
    if double:
        assert torch.equal(parts["absmax"], state.absmax)
        assert torch.equal(parts["absmax2"], state.state2.absmax) and torch.equal(parts["offset"], state.offset.view(1))
    else:
        assert torch.equal(parts["absmax"].view(torch.int32), state.absmax.view(torch.int32))
    layout = quant.part_layout(shape, fmt)
    assert {k: (tuple(t.shape), t.dtype) for k, t in parts.items()} == layout


def test_the_code_tables_are_bitsandbytes_own():
    bnbf = quant._bnb()
    for kind in ("nf4", "fp4"):
        assert torch.equal(quant.code_values(kind), bnbf.get_4bit_type(kind, device="cpu"))
    assert torch.equal(quant._dynamic_map(torch.device("cpu")), bnbf.create_dynamic_map(signed=True))
    with pytest.raises(ValueError, match="nf4 or fp4"):
        quant.code_values("int4")
