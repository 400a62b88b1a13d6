"""CPU tests of the sm90a wgmma family's staged operands (atom_ops/staging.py)."""

from __future__ import annotations

import pytest
import torch

from atom_ops import formats, staging
from atom_ops.formats import FormatError, QuantSpec


def test_int8_digits_cover_every_value_exactly():
    v = torch.arange(-128, 128, dtype=torch.int8)
    d = staging.int8_digits(v)
    assert torch.equal(16 * d["hi"].int() + d["lo"].int(), v.int())
    assert d["hi"].min() == -8 and d["hi"].max() == 8 and d["lo"].min() == -8 and d["lo"].max() == 7
    # every digit (and every INT4 value) is exact in float8 e4m3
    for t in (d["hi"], d["lo"], torch.arange(-8, 8, dtype=torch.int8)):
        assert torch.equal(t.to(torch.float16).to(staging.FP8).float(), t.float())


@pytest.mark.parametrize("k, outliers", [(576, 64), (1536, 128), (4096, 128), (1024, 0), (640, 256), (5120, 128)])
def test_staged_reference_matches_atom_reference(k, outliers):
    spec = QuantSpec(k, 128, outliers)
    g = torch.Generator().manual_seed(k + outliers)
    x = torch.randn(7, k, generator=g) * 3
    x[:, spec.k_normal:] *= 40  # outliers use the whole INT8 range, -128 included
    w = torch.randn(40, k, generator=g)
    a, wq = formats.quantize_operand(x, spec), formats.quantize_operand(w, spec)
    sa, sw = staging.stage_operand(a, "a"), staging.stage_operand(wq, "w")
    blocks = staging.staged_blocks(spec)
    assert sa.values.shape == (7, staging.staged_k(spec)) == (7, 128 * blocks)
    assert sa.values.dtype == staging.FP8 and sa.scale.shape == (blocks, 7) and sw.scale.shape == (blocks, 40)
    ref = formats.w4a4_matmul_reference(a, wq, torch.float32)
    got = staging.staged_matmul_reference(sa, sw, torch.float32)
    # Integer dots are exact; only the float product order and the outlier group's four
    # promotions differ: a few float32 ulps of the largest term.
    assert (got - ref).abs().max() <= 2e-6 * ref.abs().max() * (blocks + 4)
    # Every staged 128-block dot must stay exact in the FP8 tensor core's accumulator (< 2^14).
    va = sa.values.float().reshape(7, blocks, 128)
    vw = sw.values.float().reshape(40, blocks, 128)
    assert (va.abs().unsqueeze(1) * vw.abs().unsqueeze(0)).sum(-1).max() <= 128 * 64


def test_staging_rejects_other_groups_and_sides():
    spec = QuantSpec(1024, 64, 0)
    a = formats.quantize_operand(torch.randn(2, 1024), spec)
    with pytest.raises(FormatError, match="group 128"):
        staging.stage_operand(a, "a")
    with pytest.raises(ValueError, match="side"):
        staging.stage_operand(formats.quantize_operand(torch.randn(2, 1024), QuantSpec(1024, 128, 0)), "x")


def test_staged_k_matches_the_kernel_abi_rule():
    # atom_w4a4_api.h: staged_k(K, O) = 128 * ((K - O) / 128 + 4 * ceil(O / 128))
    for k, o in [(576, 64), (4096, 128), (11008, 128), (14336, 128), (1024, 0), (640, 256)]:
        assert staging.staged_k(QuantSpec(k, 128, o)) == 128 * ((k - o) // 128 + 4 * ((o + 127) // 128))
