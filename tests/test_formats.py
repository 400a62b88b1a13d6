"""The packed formats and the reference arithmetic every kernel is checked against."""

from fractions import Fraction

import pytest
import torch

from atom_ops import formats as F
from atom_ops.formats import FormatError, QuantSpec


def test_int4_pack_roundtrip_and_nibble_order():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    p = F.pack_int4(q)
    assert p.shape == (5, 32) and p.dtype == torch.uint8
    assert torch.equal(F.unpack_int4(p), q)
    # element 0 in the low nibble, element 1 in the high nibble (cutlass::int4b_t order)
    one = F.pack_int4(torch.tensor([[3, -2]], dtype=torch.int8))
    assert one.item() == (3 | ((-2 & 0xF) << 4))


def test_uint4_pack_roundtrip():
    q = torch.randint(0, 16, (3, 7, 128), dtype=torch.uint8)
    assert torch.equal(F.unpack_uint4(F.pack_uint4(q)), q)
    assert F.pack_uint4(torch.tensor([[1, 15]], dtype=torch.uint8)).item() == 0xF1


def test_pack_rejects_bad_input():
    with pytest.raises(FormatError, match="even"):
        F.pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(FormatError, match="int8"):
        F.pack_int4(torch.zeros(2, 4, dtype=torch.int32))


@pytest.mark.parametrize("bits,clip", [(4, 1.0), (4, 0.9), (8, 1.0)])
def test_symmetric_quantization_error_bound(bits, clip):
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    q, s = F.quantize_symmetric(x, bits, 128, clip)
    qmax = 2 ** (bits - 1) - 1
    assert q.min() >= -qmax - 1 and q.max() <= qmax
    xd = F.dequantize_symmetric(q, s, 128)
    err = (x - xd).abs().reshape(16, 2, 128)
    if clip == 1.0:  # without clipping every element is within half a step
        assert torch.all(err <= s.float()[..., None] / 2 * (1 + 1e-3) + 1e-6)
    else:  # clipped values saturate; the rest are within half a step
        inside = x.reshape(16, 2, 128).abs() <= (s.float() * qmax)[..., None]
        assert torch.all(err[inside] <= (s.float()[..., None] / 2 * (1 + 1e-3)).expand_as(err)[inside] + 1e-6)


def test_zero_group_gets_unit_scale():
    q, s = F.quantize_symmetric(torch.zeros(2, 128), 4, 128)
    assert torch.all(s == 1) and torch.all(q == 0)


def test_choose_outliers_rule():
    assert F.choose_outliers(576, 128, 128) == 64
    assert F.choose_outliers(1536, 128, 128) == 128
    assert F.choose_outliers(576, 64, 128) == 128
    assert F.choose_outliers(4096, 128, 128) == 128
    assert F.choose_outliers(11008, 128, 128) == 128
    assert F.choose_outliers(4096, 128, 0) == 0
    assert F.choose_outliers(576, 128, 0) == 64  # 576 = 4.5 groups: 64 channels must be outliers


def test_quant_spec_checks_k_rule():
    QuantSpec(576, 128, 64)
    with pytest.raises(FormatError, match="multiple of the group"):
        QuantSpec(576, 128, 128)
    with pytest.raises(FormatError, match="even"):
        QuantSpec(577, 128, 1)


def test_operand_roundtrip_layout():
    torch.manual_seed(1)
    spec = QuantSpec(576, 128, 64)
    x = torch.randn(7, 576)
    qt = F.quantize_operand(x, spec, clip=1.0)
    qt.validate()
    assert qt.packed.shape == (7, 256) and qt.outlier.shape == (7, 64) and qt.scale.shape == (7, 5)
    rel = (qt.dequantize() - x).norm() / x.norm()
    assert rel < 0.12
    # outliers are INT8: far more accurate than the INT4 part
    assert (qt.dequantize()[:, 512:] - x[:, 512:]).abs().max() < 0.05


def test_operand_validate_names_the_problem():
    spec = QuantSpec(256, 128, 0)
    qt = F.quantize_operand(torch.randn(3, 256), spec)
    bad = F.QuantizedTensor(qt.packed[:, :10], qt.outlier, qt.scale, spec)
    with pytest.raises(FormatError, match="packed"):
        bad.validate("weight")


def test_reorder_invariance_of_float_matmul():
    torch.manual_seed(2)
    x, w = torch.randn(9, 320, dtype=torch.float64), torch.randn(33, 320, dtype=torch.float64)
    perm = torch.randperm(320)
    assert torch.allclose(F.reorder(x, perm) @ F.reorder(w, perm).T, x @ w.T)


@pytest.mark.parametrize("k,group,outliers", [(576, 128, 64), (1536, 128, 128), (576, 64, 128), (512, 128, 0)])
def test_w4a4_reference_equals_float_product_of_dequantized(k, group, outliers):
    torch.manual_seed(3)
    spec = QuantSpec(k, group, outliers)
    a = F.quantize_operand(torch.randn(13, k), spec, clip=0.9)
    w = F.quantize_operand(torch.randn(48, k), spec, clip=0.85)
    y = F.w4a4_matmul_reference(a, w, out_dtype=torch.float32)
    ref = a.dequantize().double() @ w.dequantize().double().T
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)
    # group by group: the integer dots are exact, so a float64 re-derivation agrees to rounding
    res = torch.randn(13, 48).half()
    y16 = F.w4a4_matmul_reference(a, w, torch.float16, residual=res)
    assert torch.allclose(y16.float(), (ref + res.double()).float(), rtol=2e-3, atol=2e-3)


def _fma_exact(a: float, b: float, c: float) -> float:
    """a * b + c rounded once to float32 (nearest, ties to even), in exact rational arithmetic."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    near = torch.tensor(float(exact)).float()  # within one float32 step of the answer
    up, down = torch.nextafter(near, torch.tensor(float("inf"))), torch.nextafter(near, torch.tensor(float("-inf")))
    return float(min((near, up, down), key=lambda t: (abs(Fraction(float(t)) - exact), int(t.view(torch.int32)) & 1)))


def test_fma_f32_rounds_once():
    g = torch.Generator().manual_seed(5)
    dot = torch.randint(-8192, 8193, (3000,), generator=g).float()
    s = (torch.rand(3000, generator=g) * 1e-3).float()
    acc = (torch.randn(3000, generator=g) * 4).float()
    want = [_fma_exact(*v) for v in zip(dot.tolist(), s.tolist(), acc.tolist())]
    assert F.fma_f32_exact(dot, s, acc).tolist() == want
    assert F.fma_f32(dot, s, acc).tolist() == want  # torch.addcmul where the probe passed
    assert (dot * s + acc).tolist() != want  # a separate multiply and add rounds twice
    # The float64 sum is a float32 tie although the exact value is below it: float64-then-float32
    # double-rounds up (1 + 2^-22); one rounding stays at 1 + 2^-23.
    a, b, c = torch.tensor([1 + 2**-23]), torch.tensor([(1 - 2**-23) * 2**-24]), torch.tensor([1 + 2**-23])
    assert (a.double() * b.double() + c.double()).float().item() == 1 + 2**-22
    assert F.fma_f32_exact(a, b, c).item() == _fma_exact(a.item(), b.item(), c.item()) == 1 + 2**-23
    assert F.fma_f32(a, b, c).item() == 1 + 2**-23
    # An exact tie rounds to even; broadcasting operands take the exact emulation.
    assert F.fma_f32(torch.tensor([1.0]), torch.tensor([2**-24]), torch.tensor([1.0])).item() == 1.0
    assert F.fma_f32(torch.ones(2, 1), torch.full((1, 3), 0.5), torch.zeros(2, 3)).shape == (2, 3)
    # A large 2-D call (vector body and tails): the fast path equals the emulation.
    big = [torch.randint(-8192, 8193, (513, 1031), generator=g).float(), torch.rand(513, 1031, generator=g) * 1e-3,
           torch.randn(513, 1031, generator=g) * 4]
    assert torch.equal(F.fma_f32(*big), F.fma_f32_exact(*big))


def test_w4a4_reference_rejects_spec_mismatch():
    a = F.quantize_operand(torch.randn(2, 512), QuantSpec(512, 128, 0))
    w = F.quantize_operand(torch.randn(4, 512), QuantSpec(512, 64, 0))
    with pytest.raises(FormatError, match="spec"):
        F.w4a4_matmul_reference(a, w)


def test_kv_quantization_roundtrip_bound():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 10, 64) * 3
    p, s, z = F.quantize_kv(x, 64)
    assert p.shape == (2, 3, 10, 32) and s.shape == (2, 3, 10, 1)
    xd = F.dequantize_kv(p, s, z, 64)
    assert torch.all((xd - x).abs() <= s.float() / 2 + 2e-2)


def test_scale_rule_divides_on_every_device():
    # The format divides (absmax * clip / qmax); torch's CUDA kernel for tensor / python-scalar
    # would multiply by the reciprocal, which rounds differently: true_div must be a real
    # IEEE float32 division, and symmetric_scale must use it.
    import numpy as np
    x = torch.rand(200_000) * 100
    want = torch.from_numpy(x.numpy() / np.float32(7))
    assert torch.equal(F.true_div(x, 7), want)
    recip = x * (1 / 7)
    assert not torch.equal(recip, want)  # the two rules really differ on this data
    g = torch.randn(64, 128)
    absmax = g.abs().amax(-1)
    expect = torch.from_numpy((absmax.numpy() * np.float32(0.9)) / np.float32(7)).half()
    assert torch.equal(F.symmetric_scale(g, 7, 0.9), expect)
