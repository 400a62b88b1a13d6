"""CPU tests of the sm90a wgmma family's staged operands (atom_ops/staging.py)."""

from __future__ import annotations

import pytest
import torch

from atom_ops import formats, staging
from atom_ops.formats import FormatError, QuantSpec


def test_int4_values_are_exact_in_e4m3():
    t = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(t.to(torch.float16).to(staging.FP8).float(), t.float())


@pytest.mark.parametrize("k, outliers", [(576, 64), (1536, 128), (4096, 128), (1024, 0), (640, 256), (5120, 128)])
def test_staged_operand_holds_the_packed_one(k, outliers):
    spec = QuantSpec(k, 128, outliers)
    g = torch.Generator().manual_seed(k + outliers)
    x = torch.randn(7, k, generator=g) * 3
    x[:, spec.k_normal:] *= 40
    w = torch.randn(40, k, generator=g)
    a, wq = formats.quantize_operand(x, spec), formats.quantize_operand(w, spec)
    if outliers:  # the whole INT8 range (the quantizer itself stops at -127)
        a.outlier[0, 0], wq.outlier[0, 0] = -128, -128
    sa, sw = staging.stage_operand(a), staging.stage_operand(wq)
    blocks = staging.staged_blocks(spec)
    assert sa.values.shape == (7, staging.staged_k(spec)) == (7, 128 * blocks)
    assert sa.values.dtype == torch.uint8 and sa.scale.shape == (blocks, 7) and sw.scale.shape == (blocks, 40)
    G = spec.normal_groups
    # layout: e4m3 INT4 values, then the outlier bytes (int8, zero padded), scales block-major
    assert torch.equal(sa.values[:, : G * 128].view(staging.FP8).float(), formats.unpack_int4(a.packed).float())
    assert torch.equal(sa.values[:, G * 128 : G * 128 + outliers].view(torch.int8), a.outlier)
    assert not sa.values[:, G * 128 + outliers:].any()
    assert torch.equal(sa.scale[:G], a.scale[:, :G].float().T)
    if outliers:
        assert torch.equal(sa.scale[G:], a.scale[:, G:].float().T.expand(blocks - G, 7))
    for st, t in ((sa, a), (sw, wq)):
        back = staging.unstage(st)
        assert all(torch.equal(getattr(back, f), getattr(t, f)) for f in ("packed", "outlier", "scale"))
    # the staged reference is the reference, bit for bit
    assert torch.equal(staging.staged_matmul_reference(sa, sw, torch.float32),
                       formats.w4a4_matmul_reference(a, wq, torch.float32))


def test_staging_rejects_other_groups():
    spec = QuantSpec(1024, 64, 0)
    a = formats.quantize_operand(torch.randn(2, 1024), spec)
    with pytest.raises(FormatError, match="group 128"):
        staging.stage_operand(a)


def test_staged_k_matches_the_kernel_abi_rule():
    # atom_w4a4_api.h: staged_k(K, O) = 128 * ((K - O) / 128 + ceil(O / 128))
    for k, o in [(576, 64), (4096, 128), (11008, 128), (14336, 128), (1024, 0), (640, 256)]:
        assert staging.staged_k(QuantSpec(k, 128, o)) == 128 * ((k - o) // 128 + (o + 127) // 128)


@pytest.mark.parametrize("rows, k, outliers", [(64, 576, 64), (192, 1536, 128), (128, 1024, 0), (64, 640, 256)])
def test_weight_fragments_hold_the_staged_weight(rows, k, outliers):
    spec = QuantSpec(k, 128, outliers)
    g = torch.Generator().manual_seed(rows + k)
    w = formats.quantize_operand(torch.randn(rows, k, generator=g) * torch.linspace(0.1, 9, k), spec)
    if outliers:
        w.outlier[0, 0] = -128
    st = staging.stage_operand(w)
    frag = staging.weight_fragments(st)
    G, P = spec.normal_groups, staging.outlier_blocks(spec)
    assert frag.dtype == torch.uint8 and frag.shape == (rows // 64, G * 4096 + P * 8192)
    assert staging.weight_fragments(st) is frag  # made once
    assert torch.equal(staging.fragments_to_values(frag, spec), st.values)
    # The PTX A fragment of wgmma m64nNk32 (8-bit types), spelled out independently: thread t of
    # the warp group, register r of k-block kb, byte b -> row 16 (t // 32) + (t % 32) // 4 + 8 (r % 2),
    # column 32 kb + 16 (r // 2) + 4 (t % 4) + b; INT4 nibble n = 4 (4 kb + r) + b of thread t at
    # byte 2048 (n // 32) + 16 t + (n % 32) // 2 of the block's k-tile, low nibble first.
    # Every slot, written out with its own index arithmetic (not staging's): [blk, kt, t, kb, r, b].
    ints = formats.unpack_int4(w.packed).to(torch.int64)
    blk, kt, t, kb, r, b = torch.meshgrid(torch.arange(rows // 64), torch.arange(G), torch.arange(128),
                                          torch.arange(4), torch.arange(4), torch.arange(4), indexing="ij")
    n = 4 * (4 * kb + r) + b
    byte = frag[blk, kt * 4096 + 2048 * (n // 32) + 16 * t + (n % 32) // 2].to(torch.int64)
    nib = torch.where(n % 2 == 1, byte >> 4, byte & 0xF)
    row = 64 * blk + 16 * (t // 32) + (t % 32) // 4 + 8 * (r % 2)
    col = 32 * kb + 16 * (r // 2) + 4 * (t % 4) + b
    assert torch.equal(nib - 16 * (nib >= 8).long(), ints[row, 128 * kt + col])
    if outliers:
        o = frag[blk[:, :P], G * 4096 + kt[:, :P] * 8192 + 2048 * kb[:, :P] + 16 * t[:, :P] + 4 * r[:, :P]
                 + b[:, :P]].to(torch.int64)
        c = col[:, :P]
        padded = torch.nn.functional.pad(w.outlier, (0, P * 128 - outliers)).to(torch.int64)
        want = padded[row[:, :P], 128 * kt[:, :P] + c]  # (G >= P in these cases: kt's first P values)
        assert torch.equal(o - 256 * (o >= 128).long(), want)


def test_weight_fragments_need_64_row_blocks():
    spec = QuantSpec(576, 128, 64)
    st = staging.stage_operand(formats.quantize_operand(torch.randn(96, 576), spec))
    assert not staging.fragments_supported(spec, 96)
    with pytest.raises(FormatError, match="rows % 64"):
        staging.weight_fragments(st)
