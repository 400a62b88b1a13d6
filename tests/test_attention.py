"""The KV cache ops (atom_ops/attention.py): kv4_append, kv4_decode_attention, kv4_gather, and
paged_decode_attention (decode over plain fp16 / bf16 pages, the fp16 / fp8 modes' baseline).

CPU: the references against the model's RoPE, formats.quantize_kv / dequantize_kv and the engine's
torch paged attention (decode and prefill); argument errors; the decode split rule; opcheck.
GPU (`gpu` marker): each CUDA kernel against its reference over many shapes (kv4_append and
kv4_gather bit-exact; decode within fp16 / bf16 output rounding), CUDA-graph capture of decode,
and the engine on the kernels. Decode runs both kernels (ATOM_KV4_DECODE=simt and =mma, the
tensor-core kernel, which takes float16 q). kv4_prefill_attention (the fused prefill kernel, opt-in in
the engine with ATOM_KV4_PREFILL=kernel) against its reference over 120 random shapes, after appends
against gather + SDPA, and in the engine. Memcheck on a few cases (both KV4 decode kernels, the paged
fp16 / bf16 one and the prefill kernel):
    compute-sanitizer --tool memcheck python tests/test_attention.py --sanitize
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random

import pytest
import torch

from atom_ops import attention as A
from atom_ops import formats
from atom_ops.formats import FormatError

# Decode output tolerance, relative to max |v| of the pages read: the kernel and the float32
# reference round the same float result to the output dtype (1 ulp apart at most) plus float noise.
DECODE_TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


def random_pool(pages: int, page_size: int, kv_heads: int, head_dim: int, group: int, seed: int, device="cpu"):
    """A (packed, scale, zero) pool of random nibbles, scales and zeros (values within about +-4), in the
    head-major page layout [pages, kv_heads, page_size, ...]."""
    g = torch.Generator().manual_seed(seed)
    groups = head_dim // group
    packed = torch.randint(0, 256, (pages, kv_heads, page_size, head_dim // 2), generator=g, dtype=torch.uint8)
    scale = (torch.rand(pages, kv_heads, page_size, groups, generator=g) * 0.2 + 0.01).half()
    zero = torch.randn(pages, kv_heads, page_size, groups, generator=g).half()
    return tuple(t.to(device) for t in (packed, scale, zero))


def by_slot(t):
    """One pool tensor [pages, kv_heads, page_size, X] as [slots, kv_heads, X] (slot = page * page_size + offset)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def rope_tables(n: int, head_dim: int, dtype, seed: int, device="cpu"):
    """cos, sin [n, head_dim] of random positions, as models/llama.py RotaryEmbedding makes them."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 8192, (n,), generator=g).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def block_tables_for(lens, page_size: int, seed: int, extra_width: int = 0, index_dtype=torch.int64):
    """Shuffled, non-contiguous page ids for each row (page 0 = the null page pads), and the pool size."""
    rng = random.Random(seed)
    need = [math.ceil(n / page_size) for n in lens]
    width = max(max(need, default=0), 1) + extra_width
    ids = list(range(1, sum(need) + 1))
    rng.shuffle(ids)
    rows, at = [], 0
    for n in need:
        rows.append(ids[at:at + n] + [0] * (width - n))
        at += n
    return torch.tensor(rows, dtype=index_dtype), sum(need) + 1


# ------------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_reference_is_the_models_rope(dtype):
    from models.llama import apply_rope
    B, H, T, D = 2, 3, 5, 64
    x = torch.randn(B, H, T, D).to(dtype)
    cos, sin = rope_tables(B * T, D, dtype, 1)
    want = apply_rope(x, cos.view(B, T, D), sin.view(B, T, D))             # [B, H, T, D]
    got = A.rope_reference(x.transpose(1, 2).reshape(B * T, H, D), cos, sin)  # the engine's row layout
    assert torch.equal(got, want.transpose(1, 2).reshape(B * T, H, D))


@pytest.mark.parametrize("head_dim, group, rope", [(64, 64, True), (128, 32, False), (16, 16, True)])
def test_append_writes_quantize_kv_of_the_roped_rows(head_dim, group, rope):
    pages, ps, hkv, n = 5, 4, 2, 6
    k, v = torch.randn(n, hkv, head_dim) * 3, torch.randn(n, hkv, head_dim)
    cos, sin = rope_tables(n, head_dim, torch.float32, 2) if rope else (None, None)
    slots = torch.tensor([3, 17, 0, 9, 12, 4])
    k_pool, v_pool = random_pool(pages, ps, hkv, head_dim, group, 3), random_pool(pages, ps, hkv, head_dim, group, 4)
    before = [t.clone() for t in k_pool + v_pool]
    A.kv4_append(k, v, slots, k_pool, v_pool, cos, sin)
    kr = A.rope_reference(k, cos, sin) if rope else k
    for pool, old, x in ((k_pool, before[:3], kr), (v_pool, before[3:], v)):
        for t, o, want in zip(pool, old, formats.quantize_kv(x, group)):
            flat, oflat = by_slot(t), by_slot(o)
            assert torch.equal(flat[slots], want)
            untouched = torch.ones(flat.shape[0], dtype=torch.bool)
            untouched[slots] = False
            assert torch.equal(flat[untouched], oflat[untouched])


def test_gather_reference_is_dequantize_kv():
    from models.engine.kv_cache import KV4Pages
    pages = KV4Pages(layers=2, num_pages=7, page_size=4, kv_heads=2, head_dim=64, dtype=torch.float16,
                     device="cpu", group=32)
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(20, 2, 64, generator=g).half(), torch.randn(20, 2, 64, generator=g).half()
    slots = torch.randperm(28, generator=g)[:20]
    pages.write(1, slots, k, v)
    tables = torch.tensor([[3, 1, 6], [2, 0, 5]], dtype=torch.int32)
    got = A.kv4_gather(*pages.layer_pools(1), tables, torch.float16)
    for a, pool in zip(got, pages.layer_pools(1)):  # each row's pages, dequantized in order
        packed, scale, zero = (by_slot(t)[(tables.long()[:, :, None] * 4 + torch.arange(4)).reshape(2, 12)]
                               for t in pool)
        want = formats.dequantize_kv(packed, scale, zero, 32).half()  # [B, L, kv_heads, head_dim]
        assert a.is_contiguous() and torch.equal(a, want.transpose(1, 2))


def test_pool_layout_is_head_major_per_page():
    """Token slot s of kv head h is [s // page_size, h, s % page_size] of every pool tensor: a page's
    tokens of one head are contiguous (the decode kernels read a tile's scales as whole sectors)."""
    pages, ps, hkv, d, group = 4, 8, 3, 64, 32
    kp, vp = random_pool(pages, ps, hkv, d, group, 1), random_pool(pages, ps, hkv, d, group, 2)
    k, v = torch.randn(2, hkv, d), torch.randn(2, hkv, d)
    slots = torch.tensor([13, 30])  # page 1 offset 5, page 3 offset 6
    A.kv4_append(k, v, slots, kp, vp)
    for pool, x in ((kp, k), (vp, v)):
        for t, want in zip(pool, formats.quantize_kv(x, group)):
            assert torch.equal(t[1, :, 5], want[0]) and torch.equal(t[3, :, 6], want[1])
    assert kp[1].stride() == (hkv * ps * (d // group), ps * (d // group), d // group, 1)


@pytest.mark.parametrize("hq, hkv", [(4, 4), (9, 3), (8, 1)])
def test_decode_reference_matches_the_engines_paged_attention(hq, hkv):
    from models.engine.attention import paged_attention
    from models.engine.kv_cache import KV4Pages
    D, ps = 64, 4
    lens = [1, 3, 4, 5, 13]
    tables, num_pages = block_tables_for(lens, ps, 6, extra_width=1)
    pages = KV4Pages(layers=1, num_pages=num_pages, page_size=ps, kv_heads=hkv, head_dim=D, dtype=torch.float32,
                     device="cpu", group=32)
    g = torch.Generator().manual_seed(7)
    n = num_pages * ps
    pages.write(0, torch.arange(n), torch.randn(n, hkv, D, generator=g) * 2, torch.randn(n, hkv, D, generator=g))
    q = torch.randn(len(lens), hq, D, generator=g) * 2
    ctx = torch.tensor(lens)
    want = paged_attention(q[:, :, None], pages, 0, tables, ctx)[:, :, 0]
    got = A.kv4_decode_attention(q, *pages.layer_pools(0), tables, ctx)
    assert (got - want).abs().max() < 1e-5
    # a row of length 0 (a padded row) gives zeros, not NaN
    got = A.kv4_decode_attention(q[:2], *pages.layer_pools(0), tables[:2], torch.tensor([0, 2]))
    want = paged_attention(q[1:2, :, None], pages, 0, tables[1:2], torch.tensor([2]))[:, :, 0]
    assert torch.equal(got[0], torch.zeros_like(got[0])) and (got[1:] - want).abs().max() < 1e-5


@pytest.mark.parametrize("hq, hkv, T", [(4, 4, 3), (9, 3, 5), (8, 1, 7)])
def test_prefill_reference_matches_the_engines_paged_attention(hq, hkv, T):
    """kv4_prefill_attention (the reference on CPU) computes what the engine's prefill path does (pages
    read back + SDPA with the causal mask at positions context - T + t), ragged rows included; a row whose
    context is shorter than T gives zeros for the queries that see no key."""
    from models.engine.attention import paged_attention
    from models.engine.kv_cache import KV4Pages
    D, ps = 64, 4
    lens = [T, T + 1, T + 9, 17]
    tables, num_pages = block_tables_for(lens, ps, 6, extra_width=1)
    pages = KV4Pages(layers=1, num_pages=num_pages, page_size=ps, kv_heads=hkv, head_dim=D, dtype=torch.float32,
                     device="cpu", group=32)
    g = torch.Generator().manual_seed(7)
    n = num_pages * ps
    pages.write(0, torch.arange(n), torch.randn(n, hkv, D, generator=g) * 2, torch.randn(n, hkv, D, generator=g))
    q = torch.randn(len(lens), hq, T, D, generator=g) * 2
    ctx = torch.tensor(lens)
    got = A.kv4_prefill_attention(q, *pages.layer_pools(0), tables, ctx)
    want = paged_attention(q, pages, 0, tables, ctx)
    assert got.shape == q.shape and (got - want).abs().max() < 1e-5
    # one sequence with no cached prefix: the engine's is_causal path (context = T)
    want = paged_attention(q[:1], pages, 0, tables[:1, :math.ceil(T / ps)], ctx[:1], T)
    assert (A.kv4_prefill_attention(q[:1], *pages.layer_pools(0), tables[:1], ctx[:1]) - want).abs().max() < 1e-5
    # T = 1 is decode
    dec = A.kv4_decode_attention(q[:, :, -1], *pages.layer_pools(0), tables, ctx)
    assert (A.kv4_prefill_attention(q[:, :, -1:], *pages.layer_pools(0), tables, ctx)[:, :, 0] - dec).abs().max() < 1e-5
    # context shorter than T: query t sees keys 0..ctx - T + t (none for the first T - ctx)
    short = A.kv4_prefill_attention(q[:1], *pages.layer_pools(0), tables[:1], torch.tensor([2]))
    assert torch.equal(short[:, :, :T - 2], torch.zeros_like(short[:, :, :T - 2]))
    assert (short[:, :, T - 2:] - A.kv4_prefill_attention(q[:1, :, T - 2:], *pages.layer_pools(0), tables[:1],
                                                          torch.tensor([2]))).abs().max() < 1e-6


def test_prefill_kernel_choice(monkeypatch):
    monkeypatch.delenv(A.PREFILL_ENV, raising=False)
    assert not A.prefill_uses_kernel()  # the default: kv4_gather + SDPA
    monkeypatch.setenv(A.PREFILL_ENV, "gather")
    assert not A.prefill_uses_kernel()
    monkeypatch.setenv(A.PREFILL_ENV, "kernel")
    assert A.prefill_uses_kernel() == A.prefill_kernel_available()
    monkeypatch.setenv(A.PREFILL_ENV, "flash")
    with pytest.raises(FormatError, match="ATOM_KV4_PREFILL"):
        A.prefill_uses_kernel()


def test_prefill_errors_name_the_problem():
    kp, vp = _pools()
    q, tables, ctx = torch.randn(2, 4, 3, 64), torch.zeros(2, 3, dtype=torch.int32), torch.tensor([3, 4])
    with pytest.raises(FormatError, match=r"q must be \[B, q_heads, T, 64\]"):
        A.kv4_prefill_attention(torch.randn(2, 4, 64), kp, vp, tables, ctx)
    with pytest.raises(FormatError, match=r"q_heads \(3\) must be a positive multiple of kv_heads \(2\)"):
        A.kv4_prefill_attention(torch.randn(2, 3, 3, 64), kp, vp, tables, ctx)
    with pytest.raises(FormatError, match="context_lens must be a 1-D int32 or int64"):
        A.kv4_prefill_attention(q, kp, vp, tables, ctx.float())
    with pytest.raises(FormatError, match="must have q's batch 2 rows"):
        A.kv4_prefill_attention(q, kp, vp, tables[:1], ctx)
    with pytest.raises(FormatError, match="must be floating point"):
        A.kv4_prefill_attention(q.int(), kp, vp, tables, ctx)
    with pytest.raises(FormatError, match="different devices"):
        A.kv4_prefill_attention(q, kp, vp, tables, ctx.to("meta"))
    with pytest.raises(FormatError, match="different shapes or groups"):
        A.kv4_prefill_attention(q, kp, random_pool(3, 4, 2, 64, 64, 2), tables, ctx)


def test_prefill_opcheck_cpu():
    kp, vp = _pools()
    q, ctx = torch.randn(2, 4, 3, 64), torch.tensor([5, 2])
    tables = torch.tensor([[2, 1], [1, 0]])
    torch.library.opcheck(torch.ops.atom.kv4_prefill_attention.default, (q, *kp, *vp, tables, ctx))


def _pools(head_dim=64, group=32, hkv=2, device="cpu"):
    return random_pool(3, 4, hkv, head_dim, group, 1, device), random_pool(3, 4, hkv, head_dim, group, 2, device)


def test_errors_name_the_problem():
    kp, vp = _pools()
    k = v = torch.randn(2, 2, 64)
    slots = torch.tensor([1, 2])
    with pytest.raises(FormatError, match=r"k and v must be \[N, 2, 64\]"):
        A.kv4_append(torch.randn(2, 2, 32), v, slots, kp, vp)
    with pytest.raises(FormatError, match="one floating dtype"):
        A.kv4_append(k, v.half(), slots, kp, vp)
    with pytest.raises(FormatError, match="slots must be int64"):
        A.kv4_append(k, v, slots.int(), kp, vp)
    with pytest.raises(FormatError, match="cos and sin together"):
        A.kv4_append(k, v, slots, kp, vp, cos=torch.randn(2, 64))
    with pytest.raises(FormatError, match="cos must be"):
        A.kv4_append(k, v, slots, kp, vp, torch.randn(2, 64).half(), torch.randn(2, 64).half())
    with pytest.raises(FormatError, match="different devices"):
        A.kv4_append(k, v, slots.to("meta"), kp, vp)
    with pytest.raises(FormatError, match="packed must be uint8"):
        A.kv4_append(k, v, slots, (kp[0].int(), kp[1], kp[2]), vp)
    with pytest.raises(FormatError, match="scale must be float16"):
        A.kv4_append(k, v, slots, (kp[0], kp[1].float(), kp[2]), vp)
    with pytest.raises(FormatError, match="groups do not divide"):
        bad = random_pool(3, 4, 2, 64, 32, 1)
        A.kv4_append(k, v, slots, (bad[0], bad[1][..., :1].expand(3, 2, 4, 3).contiguous(),
                                   bad[2][..., :1].expand(3, 2, 4, 3).contiguous()), vp)
    with pytest.raises(FormatError, match=r"scale must be float16 \[pages, kv_heads, page_size, groups\] = \[3, 2, 4\]"):
        # the old token-major scale layout [pages, page_size, kv_heads, G] next to head-major packed
        A.kv4_append(k, v, slots, (kp[0], kp[1].transpose(1, 2).contiguous(), kp[2]), vp)
    with pytest.raises(FormatError, match="different shapes or groups"):
        A.kv4_append(k, v, slots, kp, random_pool(3, 4, 2, 64, 64, 2))
    q, tables, ctx = torch.randn(2, 4, 64), torch.zeros(2, 3, dtype=torch.int32), torch.tensor([1, 2])
    with pytest.raises(FormatError, match=r"q_heads \(3\) must be a positive multiple of kv_heads \(2\)"):
        A.kv4_decode_attention(torch.randn(2, 3, 64), kp, vp, tables, ctx)
    with pytest.raises(FormatError, match="one token per row"):
        A.kv4_decode_attention(torch.randn(2, 4, 1, 64), kp, vp, tables, ctx)
    with pytest.raises(FormatError, match="block_tables must be a 2-D int32 or int64"):
        A.kv4_decode_attention(q, kp, vp, tables.float(), ctx)
    with pytest.raises(FormatError, match="must have q's batch 2 rows"):
        A.kv4_decode_attention(q, kp, vp, tables, torch.tensor([1, 2, 3]))
    with pytest.raises(FormatError, match="must be floating point"):
        A.kv4_decode_attention(q.int(), kp, vp, tables, ctx)
    with pytest.raises(FormatError, match="dtype must be a floating"):
        A.kv4_gather(kp, vp, tables, torch.int8)


def test_kernel_limits():
    assert A.kernel_limits(128, 128, torch.float16, 32, 8) is None
    assert A.kernel_limits(64, 32, torch.bfloat16, 9, 3) is None
    assert "head_dim 96" in A.kernel_limits(96, 32, torch.float16)
    assert "group 16" in A.kernel_limits(64, 16, torch.float16)
    assert "group 128" in A.kernel_limits(64, 128, torch.float16)
    assert "float32" in A.kernel_limits(64, 64, torch.float32)
    assert "more than 8" in A.kernel_limits(128, 128, torch.float16, 32, 2)


def test_decode_split_rule():
    sms = 132
    assert A.decode_splits(256, 32, 8192, sms) == 1          # plenty of CTAs already
    assert A.decode_splits(64, 8, 4096, sms) == 1            # 512 pairs: a second split would not fit the wave
    assert A.decode_splits(16, 8, 4096, sms) == 4            # 4 splits still fit one wave of 4 per SM
    assert A.decode_splits(1, 32, 4096, sms) == 16           # 32 tiles in chunks of 2
    assert A.decode_splits(1, 8, 4096, sms) == 32            # one tile each
    assert A.decode_splits(1, 8, 100, sms) == 1              # one tile in all
    for b, h, n in [(1, 1, 1), (3, 3, 5000), (16, 8, 2048), (70, 4, 777)]:
        s = A.decode_splits(b, h, n, sms)
        tiles = math.ceil(n / A.KV4_TILE)
        assert 1 <= s <= tiles and math.ceil(tiles / math.ceil(tiles / s)) == s  # no empty split at full width


def test_decode_kernel_choice(monkeypatch):
    monkeypatch.delenv(A.DECODE_KERNEL_ENV, raising=False)
    assert A.decode_kernel_code(torch.float16) == 2 and A.decode_kernel_code(torch.bfloat16) == 1
    monkeypatch.setenv(A.DECODE_KERNEL_ENV, "simt")
    assert A.decode_kernel_code(torch.float16) == 1
    monkeypatch.setenv(A.DECODE_KERNEL_ENV, "mma")
    assert A.decode_kernel_code(torch.float16) == 2 and A.decode_kernel_code(torch.bfloat16) == 1
    monkeypatch.setenv(A.DECODE_KERNEL_ENV, "fast")
    with pytest.raises(FormatError, match="ATOM_KV4_DECODE"):
        A.decode_kernel_code(torch.float16)


def test_decode_stages_choice(monkeypatch):
    monkeypatch.delenv(A.DECODE_STAGES_ENV, raising=False)
    assert A.decode_stages() == 0  # the launcher's per-device choice
    for v, want in [("auto", 0), ("2", 2), (" 3 ", 3), ("4", 4)]:
        monkeypatch.setenv(A.DECODE_STAGES_ENV, v)
        assert A.decode_stages() == want
    for v in ("1", "5", "deep"):
        monkeypatch.setenv(A.DECODE_STAGES_ENV, v)
        with pytest.raises(FormatError, match="ATOM_KV4_STAGES"):
            A.decode_stages()


def test_opcheck_cpu():
    kp, vp = _pools()
    q, ctx = torch.randn(2, 4, 64), torch.tensor([5, 0])
    tables = torch.tensor([[2, 1], [0, 0]])
    torch.library.opcheck(torch.ops.atom.kv4_decode_attention.default, (q, *kp, *vp, tables, ctx, 0))
    torch.library.opcheck(torch.ops.atom.kv4_gather.default, (*kp, *vp, tables, torch.float16))
    k, v, slots = torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.tensor([0, 5, 11])
    cos, sin = rope_tables(3, 64, torch.float32, 1)
    torch.library.opcheck(torch.ops.atom.kv4_append.default, (k, v, slots, cos, sin, *kp, *vp))


def test_ops_compile_fullgraph_on_cpu():
    """The ops as torch.compile sees them (atom_ops.registration): one graph with no break over an
    append (a mutating op, functionalized) and a decode attention, equal to eager, pools included."""
    kp, vp = _pools()
    k, v, slots = torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.tensor([0, 5, 11])
    cos, sin = rope_tables(3, 64, torch.float32, 1)
    q, ctx, tables = torch.randn(2, 4, 64), torch.tensor([5, 12]), torch.tensor([[2, 1, 0], [0, 1, 2]])

    def step(kp, vp):
        A.kv4_append(k, v, slots, kp, vp, cos, sin)
        return A.kv4_decode_attention(q, kp, vp, tables, ctx)

    eager_pools = [tuple(t.clone() for t in pool) for pool in (kp, vp)]
    want = step(*eager_pools)
    torch._dynamo.reset()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(kp, vp)
    assert torch.equal(got, want)
    for pool, eager in zip((kp, vp), eager_pools):
        assert all(torch.equal(a, b) for a, b in zip(pool, eager))


@pytest.mark.parametrize("layout", ["llama-7b", "llama-3-8b"])
def test_bench_inputs_and_sdpa_baseline_agree_on_cpu(layout):
    """bench.attention's plumbing on a tiny case: its fp16-cache baseline (both GQA forms) computes what
    the KV4 op computes from the same pages."""
    from bench import attention as bench
    q, (kp, vp), tables, lens, k16, v16 = bench.make_case(layout, batch=2, context=40, device="cpu",
                                                          dtype=torch.float32)
    hq, hkv, d = bench.LAYOUTS[layout]
    assert q.shape == (2, hq, d) and k16.shape == (2, hkv, 40, d) and tables.shape == (2, 3)
    want = A.kv4_decode_attention(q, kp, vp, tables, lens)
    for variant in bench.sdpa_variants(hq, hkv):
        assert (bench.sdpa_decode(q, k16, v16, variant) - want).abs().max() < 1e-5, variant
    assert bench.kv4_bytes(2, 40, hkv, d) * 128 // 68 == bench.fp16_bytes(2, 40, hkv, d) // 2  # 68 B vs 256 B


# ------------------------------------------------------------ paged_decode_attention (CPU)

def float_pool(pages: int, page_size: int, kv_heads: int, head_dim: int, dtype, seed: int, device="cpu"):
    """One layer of FloatPages: random [pages, page_size, kv_heads, head_dim] values in dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(pages, page_size, kv_heads, head_dim, generator=g) * 2).to(dtype).to(device)


@pytest.mark.parametrize("hq, hkv, index_dtype", [(4, 4, torch.int64), (8, 2, torch.int32), (8, 1, torch.int64)])
def test_paged_decode_reference_is_per_row_attention(hq, hkv, index_dtype):
    """The reference against a per-row, per-head loop: gather the row's slots, softmax, weighted sum."""
    ps, d, lens = 4, 16, [0, 1, 4, 5, 11]
    tables, pages = block_tables_for(lens, ps, 3, extra_width=1, index_dtype=index_dtype)
    kp, vp = (float_pool(pages, ps, hkv, d, torch.float16, s) for s in (1, 2))
    q = torch.randn(len(lens), hq, d).half()
    got = A.paged_decode_attention(q, kp, vp, tables, torch.tensor(lens, dtype=index_dtype))
    assert got.dtype == torch.float16 and got.shape == q.shape
    for b, n in enumerate(lens):
        slots = [int(tables[b, j // ps]) * ps + j % ps for j in range(n)]
        k = kp.reshape(-1, hkv, d)[slots].float()  # [n, Hkv, D]
        v = vp.reshape(-1, hkv, d)[slots].float()
        for h in range(hq):
            kvh = h // (hq // hkv)
            if n == 0:
                want = torch.zeros(d)
            else:
                w = torch.softmax(k[:, kvh] @ q[b, h].float() / math.sqrt(d), dim=0)
                want = w @ v[:, kvh]
            torch.testing.assert_close(got[b, h].float(), want, atol=2e-3, rtol=2e-3)


def test_paged_decode_errors_name_the_problem():
    kp = float_pool(3, 4, 2, 64, torch.float16, 1)
    q, tables, ctx = torch.randn(1, 4, 64).half(), torch.tensor([[1]]), torch.tensor([2])
    with pytest.raises(FormatError, match="dtype"):
        A.paged_decode_attention(q.float(), kp, kp, tables, ctx)
    with pytest.raises(FormatError, match="differ"):
        A.paged_decode_attention(q, kp, kp[:2], tables, ctx)
    with pytest.raises(FormatError, match="4-D"):
        A.paged_decode_attention(q, kp[0], kp[0], tables, ctx)
    with pytest.raises(FormatError, match="contiguous"):
        A.paged_decode_attention(q, kp.transpose(1, 2), kp.transpose(1, 2), tables, ctx)
    with pytest.raises(FormatError, match="multiple of kv_heads"):
        A.paged_decode_attention(q[:, :3], kp, kp, tables, ctx)
    with pytest.raises(FormatError, match="head_dim|q must be"):
        A.paged_decode_attention(q[..., :32], kp, kp, tables, ctx)
    with pytest.raises(FormatError, match="block_tables"):
        A.paged_decode_attention(q, kp, kp, tables.float(), ctx)
    with pytest.raises(FormatError, match="batch"):
        A.paged_decode_attention(q, kp, kp, tables, torch.tensor([2, 3]))
    with pytest.raises(FormatError, match="splits"):
        A.paged_decode_attention(q, kp, kp, tables, ctx, splits=-1)


def test_paged_opcheck_cpu():
    kp, vp = (float_pool(3, 4, 2, 64, torch.float16, s) for s in (1, 2))
    q, ctx, tables = torch.randn(2, 4, 64).half(), torch.tensor([5, 0]), torch.tensor([[2, 1], [0, 0]])
    torch.library.opcheck(torch.ops.atom.paged_decode_attention.default, (q, kp, vp, tables, ctx, 0))



# ------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not A.kernels_available(),
                               reason="needs a CUDA GPU and the compiled extension atom_ops._C")
needs_paged_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not A.paged_kernel_available(),
                                     reason="needs a CUDA GPU and atom_ops._C with paged_decode_attention")
GPU = "cuda"  # the device of the GPU cases' tensors (a CPU emulation of the kernels may swap it)
LAYOUTS = [(9, 3, 64), (32, 32, 128), (32, 8, 128), (8, 8, 64), (24, 3, 128), (12, 4, 64)]  # (Hq, Hkv, D)


def append_cases(n=48, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        _, hkv, d = LAYOUTS[i % len(LAYOUTS)]
        group = rng.choice([g for g in A.GROUPS if d % g == 0])
        dtype = (torch.float16, torch.bfloat16)[(i // len(LAYOUTS)) % 2]
        yield rng.choice([1, 2, 5, 31, 64, 257, 1000]), hkv, d, group, dtype, i % 3 != 0, rng.random() < 0.5


def run_append_case(n, hkv, d, group, dtype, rope, strided, seed):
    """(kernel pools, reference pools) after appending n random rows into a random pool."""
    g = torch.Generator().manual_seed(seed)
    ps = 16
    pages = math.ceil(n / ps) + 3
    x = (torch.randn(n, 3 * hkv, d, generator=g) * 4).to(dtype).to(GPU)
    x[0, 0, :group] = 0.75                                       # a constant group: scale 0 -> 1
    k = x[:, :hkv] if strided else x[:, :hkv].contiguous()       # rows 3 * hkv * d apart, as in a fused qkv
    v = x[:, 2 * hkv:]
    cos, sin = rope_tables(n, d, dtype, seed, GPU) if rope else (None, None)
    slots = torch.randperm(pages * ps, generator=g)[:n].to(GPU)
    base = [random_pool(pages, ps, hkv, d, group, seed + s, GPU) for s in (1, 2)]
    got, want = [tuple(t.clone() for t in p) for p in base], [tuple(t.clone() for t in p) for p in base]
    A.kv4_append(k, v, slots, got[0], got[1], cos, sin)
    A.kv4_append_reference(k, v, slots, want[0], want[1], cos, sin)
    return got, want


@pytest.mark.gpu
@needs_gpu
def test_gpu_append_bit_exact():
    bad = []
    for i, case in enumerate(append_cases()):
        got, want = run_append_case(*case, seed=100 + i)
        for label, a, b in zip(("k", "v"), got, want):
            for name, x, y in zip(("packed", "scale", "zero"), a, b):
                if not torch.equal(x, y):
                    bad.append(f"{case}: {label} {name} differs in {int((x != y).sum())} places")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("d, dtype", [(128, torch.float16), (64, torch.bfloat16)])
def test_gpu_append_unaligned_rows_bit_exact(d, dtype):
    """Rows that start at odd elements (ld = kv_heads * d + 1, one element in) and RoPE tables
    misaligned the same way: the kernel must not assume vector alignment of its inputs."""
    n, hkv, group, ps = 37, 4, 32, 16
    g = torch.Generator().manual_seed(7)
    ld = hkv * d + 1
    buf = (torch.randn(2 * n * ld + 2, generator=g) * 4).to(dtype).to(GPU)
    k = buf[1:].as_strided((n, hkv, d), (ld, d, 1))
    v = buf[n * ld + 1:].as_strided((n, hkv, d), (ld, d, 1))
    cos_t, sin_t = rope_tables(n, d, dtype, 3, GPU)
    cos = torch.cat([cos_t.new_zeros(n, 1), cos_t], dim=1)[:, 1:]  # rows d + 1 apart, odd start
    sin = torch.cat([sin_t.new_zeros(n, 1), sin_t], dim=1)[:, 1:]
    pages = math.ceil(n / ps) + 2
    slots = torch.randperm(pages * ps, generator=g)[:n].to(GPU)
    base = [random_pool(pages, ps, hkv, d, group, s, GPU) for s in (1, 2)]
    got, want = [tuple(t.clone() for t in p) for p in base], [tuple(t.clone() for t in p) for p in base]
    A.kv4_append(k, v, slots, got[0], got[1], cos, sin)
    A.kv4_append_reference(k, v, slots, want[0], want[1], cos, sin)
    for a, b in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("d, group, ps, dtype, index_dtype", [
    (64, 64, 16, torch.float16, torch.int64), (128, 32, 32, torch.bfloat16, torch.int32),
    (128, 128, 16, torch.float16, torch.int32), (64, 32, 7, torch.bfloat16, torch.int64)])
def test_gpu_gather_bit_exact(d, group, ps, dtype, index_dtype):
    lens = [1, ps - 1, ps, ps + 1, 700, 0]
    tables, pages = block_tables_for(lens, ps, 3, extra_width=2, index_dtype=index_dtype)
    kp, vp = (random_pool(pages, ps, 4, d, group, s, GPU) for s in (1, 2))
    tables = tables.to(GPU)
    got = A.kv4_gather(kp, vp, tables, dtype)
    want = A.kv4_gather_reference(kp, vp, tables, dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    sliced = torch.cat([tables, tables], dim=1)[:, : tables.shape[1]]  # a non-contiguous table
    assert all(torch.equal(a, b) for a, b in zip(A.kv4_gather(kp, vp, sliced, dtype), want))


def decode_cases(n=60, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        hq, hkv, d = LAYOUTS[i % len(LAYOUTS)]
        group = rng.choice([g for g in A.GROUPS if d % g == 0])
        ps = rng.choice([16, 32])
        b = rng.choice([1, 2, 3, 7, 16, 33, 70])
        special = [0, 1, ps - 1, ps, ps + 1, 127, 128, 129, 1000, 5000]
        lens = [rng.choice(special) if rng.random() < 0.6 else rng.randint(1, 5000) for _ in range(b)]
        # the float32 reference holds K and V as [B, Hkv, max_len, D]: keep that under ~1.2 GB
        cap = max(1, int(1.5e8 / (b * hkv * d)))
        lens = [min(x, cap) for x in lens]
        dtype = (torch.float16, torch.bfloat16)[(i // len(LAYOUTS)) % 2]
        yield (b, hq, hkv, d, group, ps, lens, dtype, rng.choice([0, 0, 1, 2, 5]), rng.choice([torch.int32, torch.int64]),
               rng.choice([0.5, 2.0, 6.0]))


def decode_case_inputs(b, hq, d, ps, lens, dtype, index_dtype, q_scale, seed, make_pool):
    """What every decode case starts from, on GPU: q [b, hq, d], k and v pools from
    make_pool(pages, seed), block tables over shuffled pages and the context lengths."""
    tables, pages = block_tables_for(lens, ps, seed, extra_width=seed % 3, index_dtype=index_dtype)
    kp, vp = (make_pool(pages, seed + s) for s in (1, 2))
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, d, generator=g) * q_scale).to(dtype).to(GPU)
    return q, kp, vp, tables.to(GPU), torch.tensor(lens, dtype=index_dtype, device=GPU)


def run_decode_case(b, hq, hkv, d, group, ps, lens, dtype, splits, index_dtype, q_scale, seed):
    """(kernel output, reference output, max |v| of the pages read)."""
    q, kp, vp, tables, ctx = decode_case_inputs(
        b, hq, d, ps, lens, dtype, index_dtype, q_scale, seed,
        lambda pages, s: random_pool(pages, ps, hkv, d, group, s, GPU))
    got = A.kv4_decode_attention(q, kp, vp, tables, ctx, splits=splits)
    want = A.kv4_decode_reference(q, kp, vp, tables, ctx)
    vmax = float(formats.dequantize_kv(*vp, group).abs().max())
    return got, want, vmax


DECODE_KERNELS = ("simt", "mma")  # ATOM_KV4_DECODE values: every decode kernel runs every case


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_gpu_decode_matches_reference(kernel, monkeypatch):
    monkeypatch.setenv(A.DECODE_KERNEL_ENV, kernel)
    bad = []
    for i, case in enumerate(decode_cases()):
        got, want, vmax = run_decode_case(*case, seed=200 + i)
        err = float((got.float() - want.float()).abs().max())
        dtype = case[7]
        if not torch.isfinite(got).all() or err > DECODE_TOL[dtype] * vmax:
            bad.append(f"case {i} {case[:6]} lens={case[6][:8]} {dtype} splits={case[8]}: err {err:.3g} "
                       f"(tol {DECODE_TOL[dtype] * vmax:.3g})")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_gpu_decode_zero_length_rows_are_zero(kernel, monkeypatch):
    monkeypatch.setenv(A.DECODE_KERNEL_ENV, kernel)
    got, want, _ = run_decode_case(3, 8, 2, 128, 128, 16, [0, 40, 0], torch.float16, 3, torch.int64, 1.0, seed=5)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.gpu
@needs_gpu
def test_gpu_decode_stages_bit_identical(monkeypatch):
    """The tensor-core kernel's stage count (ATOM_KV4_STAGES) changes its memory pipeline only: every
    float16 case gives the same bits with 2, 3 and 4 stages as with the default."""
    monkeypatch.setenv(A.DECODE_KERNEL_ENV, "mma")
    bad = []
    for i, case in enumerate(decode_cases()):
        if case[7] != torch.float16:
            continue
        outs = {}
        for stages in ("auto", *map(str, A.DECODE_STAGES)):
            monkeypatch.setenv(A.DECODE_STAGES_ENV, stages)
            outs[stages], _, _ = run_decode_case(*case, seed=200 + i)
        bad += [f"case {i} {case[:6]} stages {k}" for k, v in outs.items() if not torch.equal(v, outs["auto"])]
    assert not bad, "\n".join(bad[:20])


@pytest.mark.gpu
@needs_gpu
def test_gpu_decode_in_a_cuda_graph():
    """Captured once at full width, replayed for other context lengths: no host sync in the op."""
    b, hq, hkv, d, group, ps = 4, 32, 8, 128, 128, 16
    lens = [1000, 17, 1, 640]
    tables, pages = block_tables_for(lens, ps, 9)
    kp, vp = (random_pool(pages, ps, hkv, d, group, s, "cuda") for s in (1, 2))
    q = torch.randn(b, hq, d, device="cuda").half()
    tables, ctx = tables.cuda(), torch.tensor(lens, device="cuda")
    vmax = float(formats.dequantize_kv(*vp, group).abs().max())
    check_decode_graph_replays(A.kv4_decode_attention, A.kv4_decode_reference, q, kp, vp, tables, ctx,
                               DECODE_TOL[torch.float16] * vmax)


def check_decode_graph_replays(op, reference, q, kp, vp, tables, ctx, tol: float) -> None:
    """op captured once in a CUDA graph at ctx's lengths, replayed after ctx is overwritten with other
    lengths: every replay is within tol of the reference (the op reads lengths on the device only)."""
    for _ in range(2):  # warm-up off the capture
        op(q, kp, vp, tables, ctx)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, kp, vp, tables, ctx)
    for new in ([999, 16, 0, 641], [5, 900, 33, 1]):
        ctx.copy_(torch.tensor(new))
        graph.replay()
        want = reference(q, kp, vp, tables, ctx)
        assert (out.float() - want.float()).abs().max() <= tol


@pytest.mark.gpu
@needs_gpu
def test_gpu_kernel_limits_raise():
    kp, vp = (random_pool(3, 4, 2, 96, 32, s, "cuda") for s in (1, 2))
    q, tables, ctx = torch.randn(1, 2, 96, device="cuda").half(), torch.tensor([[1]], device="cuda"), torch.tensor([2], device="cuda")
    with pytest.raises(FormatError, match="head_dim 96"):
        A.kv4_decode_attention(q, kp, vp, tables, ctx)
    with pytest.raises(FormatError, match="float32"):
        kp, vp = _pools(device="cuda")
        A.kv4_gather(kp, vp, tables, torch.float32)


@pytest.mark.gpu
@needs_gpu
def test_gpu_opcheck():
    kp, vp = _pools(device="cuda")
    q, ctx = torch.randn(2, 4, 64, device="cuda").half(), torch.tensor([5, 0], device="cuda")
    tables = torch.tensor([[2, 1], [0, 0]], device="cuda")
    torch.library.opcheck(torch.ops.atom.kv4_decode_attention.default, (q, *kp, *vp, tables, ctx, 0))
    torch.library.opcheck(torch.ops.atom.kv4_gather.default, (*kp, *vp, tables, torch.bfloat16))
    k, v, slots = torch.randn(3, 2, 64, device="cuda").half(), torch.randn(3, 2, 64, device="cuda").half(), \
        torch.tensor([0, 5, 11], device="cuda")
    cos, sin = rope_tables(3, 64, torch.float16, 1, "cuda")
    torch.library.opcheck(torch.ops.atom.kv4_append.default, (k, v, slots, cos, sin, *kp, *vp))
    before = [t._version for t in kp + vp]  # the kernel writes by pointer; the op bumps the versions
    A.kv4_append(k, v, slots, kp, vp, cos, sin)
    assert all(t._version > b for t, b in zip(kp + vp, before))


def _kv4_model(dtype=torch.float16):
    """A small random Llama with head_dim 64 and GQA 2, quantized KV cache (KV4 pages), on the GPU."""
    from models.config import LlamaConfig
    from models.llama import LlamaForCausalLM
    from models.quantized_linear import KV4Quantizer
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    for layer in model.model.layers:
        layer.self_attn.kv_quantizer = KV4Quantizer(128)
    model = model.to(dtype).cuda()
    model.model.rotary_emb.reset_buffers("cuda")
    return model


@pytest.mark.gpu
@needs_gpu
def test_gpu_engine_on_the_kernels_matches_the_plain_forward():
    """Chunked prefill (gather + SDPA) and decode (decode kernel) on KV4 pages: logits close to the
    plain forward with the KV4 quantizer (fp16 rounding of K/V there, float32 in the kernel)."""
    from models.engine import Engine, EngineConfig, SamplingParams
    from models.engine.scheduler import Sequence
    from test_engine import check_runner_matches_plain
    model = _kv4_model()
    engine = Engine(model, EngineConfig(page_size=16, max_context=256, max_batch=4))
    assert engine.kv_format == "kv4" and engine.pages.fused
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(f"s{i}", torch.randint(0, 256, (n,), generator=g).tolist(), SamplingParams(), 32, None)
            for i, n in enumerate((40, 17))]
    check_runner_matches_plain(model, engine, seqs, ([25, 15], [17]), steps=4, rtol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_engine_cuda_graphs_on_the_kernels():
    from models.engine import Engine, EngineConfig, SamplingParams
    model = _kv4_model()
    config = EngineConfig(max_batch=4, page_size=16, max_context=256, graph_buckets=(1, 2, 4))
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 3, 19)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    padded = [c.token_ids for c in Engine(model, dataclasses.replace(config, static_decode_shapes=True)).generate(ps, params)]
    graphed = [c.token_ids for c in Engine(model, dataclasses.replace(config, cuda_graphs=True)).generate(ps, params)]
    assert padded == graphed  # a replayed graph runs the same kernels on the same shapes



# ------------------------------------------------------------ paged_decode_attention (GPU)

def paged_cases(n=48, seed=0):
    """Mixed lengths (0, 1, page and 128-token boundaries, up to ~1500), GQA 1 / 4 / 8, D 64 / 128,
    fp16 / bf16, int32 / int64 tables, forced and rule-chosen splits."""
    rng = random.Random(seed)
    layouts = [(8, 8, 128), (16, 4, 128), (8, 1, 64), (32, 8, 128), (4, 4, 64), (12, 3, 64), (32, 4, 128)]
    for i in range(n):
        hq, hkv, d = layouts[i % len(layouts)]
        ps = rng.choice([1, 7, 16, 32])
        b = rng.choice([1, 2, 3, 5, 9])
        special = [0, 1, ps - 1, ps, ps + 1, 31, 32, 33, 127, 128, 129, 1000, 1500]
        lens = [rng.choice(special) if rng.random() < 0.6 else rng.randint(1, 1500) for _ in range(b)]
        dtype = (torch.float16, torch.bfloat16)[(i // len(layouts)) % 2]
        yield (b, hq, hkv, d, ps, lens, dtype, rng.choice([0, 0, 1, 2, 5]), (torch.int32, torch.int64)[i % 2],
               rng.choice([0.5, 2.0, 6.0]))


def run_paged_case(b, hq, hkv, d, ps, lens, dtype, splits, index_dtype, q_scale, seed):
    """(kernel output, reference output, max |v| of the pages)."""
    q, kp, vp, tables, ctx = decode_case_inputs(
        b, hq, d, ps, lens, dtype, index_dtype, q_scale, seed,
        lambda pages, s: float_pool(pages, ps, hkv, d, dtype, s, GPU))
    got = A.paged_decode_attention(q, kp, vp, tables, ctx, splits=splits)
    want = A.paged_decode_reference(q, kp, vp, tables, ctx)
    return got, want, float(vp.float().abs().max())


def paged_case_ok(got, want, vmax, dtype) -> tuple[bool, float]:
    err = float((got.float() - want.float()).abs().max())
    return bool(torch.isfinite(got).all()) and err <= DECODE_TOL[dtype] * vmax, err


@pytest.mark.gpu
@needs_paged_gpu
def test_gpu_paged_decode_matches_reference():
    bad = []
    for i, case in enumerate(paged_cases()):
        got, want, vmax = run_paged_case(*case, seed=500 + i)
        ok, err = paged_case_ok(got, want, vmax, case[6])
        if not ok:
            bad.append(f"case {i} {case[:5]} lens={case[5][:8]} {case[6]} splits={case[7]}: err {err:.3g}")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.gpu
@needs_paged_gpu
def test_gpu_paged_decode_zero_length_rows_are_zero():
    got, _, _ = run_paged_case(3, 8, 2, 128, 16, [0, 40, 0], torch.float16, 3, torch.int64, 1.0, seed=5)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.gpu
@needs_paged_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_paged_decode_in_a_cuda_graph(dtype):
    """Captured once at full width, replayed for other context lengths: no host sync in the op."""
    b, hq, hkv, d, ps = 4, 32, 8, 128, 16
    lens = [1000, 17, 1, 640]
    tables, pages = block_tables_for(lens, ps, 9)
    kp, vp = (float_pool(pages, ps, hkv, d, dtype, s, "cuda") for s in (1, 2))
    q = torch.randn(b, hq, d, device="cuda").to(dtype)
    tables, ctx = tables.cuda(), torch.tensor(lens, device="cuda")
    check_decode_graph_replays(A.paged_decode_attention, A.paged_decode_reference, q, kp, vp, tables, ctx,
                               DECODE_TOL[dtype] * float(vp.float().abs().max()))


@pytest.mark.gpu
@needs_paged_gpu
def test_gpu_paged_kernel_limits_and_opcheck():
    kp = float_pool(3, 4, 2, 96, torch.float16, 1, "cuda")
    q, tables, ctx = torch.randn(1, 2, 96, device="cuda").half(), torch.tensor([[1]], device="cuda"), torch.tensor([2], device="cuda")
    with pytest.raises(FormatError, match="head_dim 96"):
        A.paged_decode_attention(q, kp, kp, tables, ctx)
    kp, vp = (float_pool(3, 4, 2, 64, torch.bfloat16, s, "cuda") for s in (1, 2))
    q, ctx = torch.randn(2, 4, 64, device="cuda").bfloat16(), torch.tensor([5, 0], device="cuda")
    tables = torch.tensor([[2, 1], [0, 0]], device="cuda")
    torch.library.opcheck(torch.ops.atom.paged_decode_attention.default, (q, kp, vp, tables, ctx, 0))

# ------------------------------------------------------------ kv4_prefill_attention (GPU)

PREFILL_LAYOUTS = [(8, 8, 128), (32, 8, 128), (9, 3, 64), (8, 1, 64), (24, 3, 128), (12, 4, 64), (4, 4, 64),
                   (16, 2, 128)]  # (Hq, Hkv, D): GQA 1, 2, 3, 4, 8


def prefill_cases(n=120, seed=0):
    """Random prefill shapes: T = 1..130 new tokens, contexts 1..600 (ragged rows; some shorter than T, whose
    first queries see nothing), D 64 / 128 with every group, GQA 1..8, page sizes 1..32, fp16 / bf16."""
    rng = random.Random(seed)
    for i in range(n):
        hq, hkv, d = PREFILL_LAYOUTS[i % len(PREFILL_LAYOUTS)]
        group = rng.choice([g for g in A.GROUPS if d % g == 0])
        ps = rng.choice([1, 5, 16, 16, 32])
        b = rng.choice([1, 1, 2, 3, 4])
        T = rng.choice([1, 2, 7, 15, 16, 17, 63, 64, 65, 100, 128, 129, 130, rng.randint(1, 130)])
        special = [T, T, T + 1, T + 63, T + 64, T + 65, 127, 128, 129, 600, max(1, T - 3)]
        lens = [min(600, rng.choice(special) if rng.random() < 0.7 else rng.randint(T, 600)) for _ in range(b)]
        dtype = (torch.float16, torch.bfloat16)[(i // len(PREFILL_LAYOUTS)) % 2]
        yield (b, hq, hkv, d, group, ps, T, lens, dtype, rng.choice([torch.int32, torch.int64]),
               rng.choice([0.5, 2.0, 6.0]))


def run_prefill_case(b, hq, hkv, d, group, ps, T, lens, dtype, index_dtype, q_scale, seed, strided=False):
    """(kernel output, reference output, max |v| of the pages read)."""
    tables, pages = block_tables_for(lens, ps, seed, extra_width=seed % 3, index_dtype=index_dtype)
    kp, vp = (random_pool(pages, ps, hkv, d, group, seed + s, GPU) for s in (1, 2))
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, T, hq, d, generator=g) * q_scale).to(dtype).to(GPU)
    q = q.transpose(1, 2) if strided else q.transpose(1, 2).contiguous()  # the model's q is [B, Hq, T, D] (a view)
    tables, ctx = tables.to(GPU), torch.tensor(lens, dtype=index_dtype, device=GPU)
    got = A.kv4_prefill_attention(q, kp, vp, tables, ctx)
    want = A.kv4_prefill_attention_reference(q, kp, vp, tables, ctx)
    vmax = float(formats.dequantize_kv(*vp, group).abs().max())
    return got, want, vmax


# Prefill tolerance, relative to max |v|: as decode, plus P rounded to bfloat16 for the P . V MMA.
PREFILL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def prefill_case_ok(got, want, vmax, dtype) -> tuple[bool, float]:
    err = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
    return bool(torch.isfinite(got).all()) and got.shape == want.shape and err <= PREFILL_TOL[dtype] * vmax, err


@pytest.mark.gpu
@needs_gpu
def test_gpu_prefill_matches_reference():
    bad = []
    for i, case in enumerate(prefill_cases()):
        got, want, vmax = run_prefill_case(*case, seed=800 + i, strided=i % 2 == 1)
        ok, err = prefill_case_ok(got, want, vmax, case[8])
        if not ok:
            bad.append(f"case {i} {case[:7]} lens={case[7]} {case[8]}: err {err:.3g} (tol {PREFILL_TOL[case[8]] * vmax:.3g})")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.gpu
@needs_gpu
def test_gpu_prefill_after_append_matches_gather_sdpa(monkeypatch):
    """The engine's order: append T new rows per sequence, then attend; the fused kernel against
    kv4_gather + SDPA (the default prefill path) on the same pages."""
    from models.engine.attention import paged_attention
    from models.engine.kv_cache import KV4Pages
    B, T, hq, hkv, D, ps = 2, 37, 8, 2, 128, 16
    prefix = [50, 0]
    lens = [p + T for p in prefix]
    tables, num_pages = block_tables_for(lens, ps, 4, extra_width=1)
    pages = KV4Pages(layers=1, num_pages=num_pages, page_size=ps, kv_heads=hkv, head_dim=D, dtype=torch.float16,
                     device="cuda", group=64)
    g = torch.Generator().manual_seed(3)
    slot = lambda b, j: int(tables[b, j // ps]) * ps + j % ps
    all_slots = torch.tensor([slot(b, j) for b in range(B) for j in range(lens[b])], device="cuda")
    n = len(all_slots)
    pages.write(0, all_slots, (torch.randn(n, hkv, D, generator=g) * 2).half().cuda(),
                torch.randn(n, hkv, D, generator=g).half().cuda())
    q = (torch.randn(B, hq, T, D, generator=g) * 2).half().cuda()
    tables, ctx = tables.cuda(), torch.tensor(lens, device="cuda")
    got = A.kv4_prefill_attention(q, *pages.layer_pools(0), tables, ctx)
    monkeypatch.delenv(A.PREFILL_ENV, raising=False)
    want = paged_attention(q, pages, 0, tables, ctx)  # gather + SDPA
    assert (got.float() - want.float()).abs().max() < 2e-2
    monkeypatch.setenv(A.PREFILL_ENV, "kernel")
    assert torch.equal(paged_attention(q, pages, 0, tables, ctx), got)  # the engine's opt-in path


def _engine_prefill_then_decode(monkeypatch, prefill_env: str | None):
    """The engine's chunked prefill (two rounds, packed segments with and without a cached prefix)
    then 4 decode steps of a small KV4 model: (prefill logits per round, decode logits per step,
    each layer's packed K and V pages)."""
    from models.engine import Engine, EngineConfig, SamplingParams
    from models.engine.kv_cache import pages_for
    from models.engine.scheduler import Sequence
    if prefill_env is None:
        monkeypatch.delenv(A.PREFILL_ENV, raising=False)
    else:
        monkeypatch.setenv(A.PREFILL_ENV, prefill_env)
    model = _kv4_model()
    engine = Engine(model, EngineConfig(page_size=16, max_context=256, max_batch=4))
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(f"s{i}", torch.randint(0, 256, (n,), generator=g).tolist(), SamplingParams(), 32, None)
            for i, n in enumerate((40, 17))]
    for seq in seqs:
        seq.pages = engine.allocator.allocate(pages_for(seq.num_tokens + 8, 16))
    prefill, decode = [], []
    for chunks in ([(0, 25), (1, 17)], [(0, 15)]):
        prefill.append(engine.runner.prefill([(seqs[i], n) for i, n in chunks]).float())
        for i, n in chunks:
            seqs[i].num_cached += n
    for step in range(4):
        for seq, tok in zip(seqs, (7 + step, 20 + step)):
            seq.output_ids.append(tok)
        decode.append(engine.runner.decode(seqs).float())
        for seq in seqs:
            seq.num_cached += 1
    pages = engine.runner.pages
    packed = [[pages.layer_pools(layer)[kv][0].clone() for kv in (0, 1)] for layer in range(2)]
    return prefill, decode, packed


@pytest.mark.gpu
@needs_gpu
def test_gpu_engine_with_the_prefill_kernel_matches_the_default_path(monkeypatch):
    """ATOM_KV4_PREFILL=kernel against the default prefill (kv4_gather + SDPA) in the engine. The two
    attention outputs differ by rounding only (test above); through a second layer such a difference
    can move a K / V value across an INT4 step of that layer's cache (measured on the H100: 26 and 32 of
    133120 nibbles, one step each), which the decode steps then see: so the check is on the pages
    (layer 0, written before any attention, identical; later layers: a few nibbles, one step) and on
    the prefill logits, and decode only loosely."""
    base = _engine_prefill_then_decode(monkeypatch, None)
    fused = _engine_prefill_then_decode(monkeypatch, "kernel")
    for want, got in zip(base[0] + base[1], fused[0] + fused[1]):
        assert torch.isfinite(got).all() and got.shape == want.shape
    for want, got in zip(base[0], fused[0]):
        assert (got - want).abs().max() <= 3e-2 * want.abs().max(), (got - want).abs().max()
    for want, got in zip(base[1], fused[1]):
        assert (got - want).abs().max() <= 0.1 * want.abs().max(), (got - want).abs().max()
    nibbles = lambda t: torch.stack([(t & 15).int(), (t >> 4).int()], -1)
    for layer, (want_kv, got_kv) in enumerate(zip(base[2], fused[2])):
        for want, got in zip(want_kv, got_kv):
            step = (nibbles(got) - nibbles(want)).abs()
            if layer == 0:
                assert torch.equal(got, want)
            else:
                assert step.max() <= 1 and (step > 0).sum() <= 1e-3 * step.numel(), (layer, int((step > 0).sum()))


@pytest.mark.gpu
@needs_gpu
def test_gpu_prefill_opcheck_and_limits():
    kp, vp = _pools(device="cuda")
    q, ctx = torch.randn(2, 4, 3, 64, device="cuda").half(), torch.tensor([5, 3], device="cuda")
    tables = torch.tensor([[2, 1], [0, 0]], device="cuda")
    torch.library.opcheck(torch.ops.atom.kv4_prefill_attention.default, (q, *kp, *vp, tables, ctx))
    kp, vp = (random_pool(3, 4, 2, 96, 32, s, "cuda") for s in (1, 2))
    with pytest.raises(FormatError, match="head_dim 96"):
        A.kv4_prefill_attention(torch.randn(1, 2, 3, 96, device="cuda").half(), kp, vp, tables[:1], ctx[:1])


# ------------------------------------------------------------------------- sanitizer

def sanitize_main() -> int:
    """A few cases per kernel, for `compute-sanitizer --tool memcheck python tests/test_attention.py --sanitize`."""
    bad = 0
    for i, case in enumerate(list(append_cases(6, seed=1))):
        got, want = run_append_case(*case, seed=300 + i)
        ok = all(torch.equal(x, y) for a, b in zip(got, want) for x, y in zip(a, b))
        bad += not ok
        print(f"sanitize kv4_append {case}: {'ok' if ok else 'BAD'}")
    for i, (d, group, ps) in enumerate([(64, 32, 16), (128, 128, 32)]):
        tables, pages = block_tables_for([1, ps + 1, 300, 0], ps, i, extra_width=1)
        kp, vp = (random_pool(pages, ps, 3, d, group, s, GPU) for s in (1, 2))
        got = A.kv4_gather(kp, vp, tables.to(GPU), torch.float16)
        ok = all(torch.equal(a, b) for a, b in zip(got, A.kv4_gather_reference(kp, vp, tables.to(GPU), torch.float16)))
        bad += not ok
        print(f"sanitize kv4_gather D={d} group={group} ps={ps}: {'ok' if ok else 'BAD'}")
    cases = [(3, 9, 3, 64, 64, 16, [0, 1, 300], torch.float16, 0, torch.int64, 2.0),
             (2, 8, 1, 128, 32, 32, [17, 1500], torch.float16, 2, torch.int32, 1.0),
             (2, 12, 4, 64, 32, 16, [129, 0], torch.float16, 1, torch.int64, 0.5),
             (2, 32, 8, 128, 32, 32, [33, 1500], torch.bfloat16, 3, torch.int32, 1.0),
             (5, 24, 3, 128, 128, 16, [15, 16, 17, 0, 700], torch.float16, 1, torch.int64, 6.0),
             (1, 32, 32, 128, 64, 16, [4097], torch.float16, 0, torch.int32, 0.5)]
    for kernel, stages in [("simt", "auto"), *(("mma", str(s)) for s in A.DECODE_STAGES)]:
        os.environ[A.DECODE_KERNEL_ENV] = kernel
        os.environ[A.DECODE_STAGES_ENV] = stages
        for i, case in enumerate(cases):
            got, want, vmax = run_decode_case(*case, seed=400 + i)
            torch.cuda.synchronize()
            ok = bool(torch.isfinite(got).all()) and float((got.float() - want.float()).abs().max()) <= DECODE_TOL[case[7]] * vmax
            bad += not ok
            print(f"sanitize kv4_decode_attention [{kernel}, stages {stages}] {case[:7]}: {'ok' if ok else 'BAD'}")
    os.environ.pop(A.DECODE_KERNEL_ENV, None)
    os.environ.pop(A.DECODE_STAGES_ENV, None)
    paged = [(3, 8, 8, 128, 16, [0, 1, 300], torch.float16, 0, torch.int64, 2.0),
             (2, 8, 1, 64, 7, [17, 1500], torch.bfloat16, 2, torch.int32, 1.0),
             (2, 16, 4, 128, 32, [129, 0], torch.float16, 1, torch.int64, 0.5),
             (5, 12, 3, 64, 16, [15, 16, 17, 0, 700], torch.bfloat16, 5, torch.int32, 6.0)]
    for i, case in enumerate(paged):
        got, want, vmax = run_paged_case(*case, seed=600 + i)
        torch.cuda.synchronize()
        ok, _ = paged_case_ok(got, want, vmax, case[6])
        bad += not ok
        print(f"sanitize paged_decode_attention {case[:6]}: {'ok' if ok else 'BAD'}")
    prefill = [(2, 8, 2, 128, 64, 16, 37, [87, 37], torch.float16, torch.int64, 2.0),
               (3, 9, 3, 64, 32, 5, 65, [65, 600, 60], torch.bfloat16, torch.int32, 1.0),
               (1, 32, 8, 128, 32, 32, 130, [131], torch.float16, torch.int32, 6.0),
               (2, 4, 4, 64, 64, 1, 1, [1, 200], torch.bfloat16, torch.int64, 0.5),
               (2, 16, 2, 128, 128, 16, 17, [17, 300], torch.bfloat16, torch.int64, 2.0)]
    for i, case in enumerate(prefill):
        got, want, vmax = run_prefill_case(*case, seed=900 + i, strided=i % 2 == 0)
        torch.cuda.synchronize()
        ok, _ = prefill_case_ok(got, want, vmax, case[8])
        bad += not ok
        print(f"sanitize kv4_prefill_attention {case[:8]}: {'ok' if ok else 'BAD'}")
    print("sanitize done", "FAIL" if bad else "ok")
    return 1 if bad else 0


def test_kv4_splits_bench_cases_parse():
    from bench.kv4_splits import DEFAULT_CASES, parse_case
    assert parse_case("llama-3-8b:64:2048") == ("llama-3-8b", 64, 2048)
    assert all(parse_case(c)[0] in ("llama-7b", "llama-3-8b") for c in DEFAULT_CASES)
    with pytest.raises(argparse.ArgumentTypeError, match="layout:batch:context"):
        parse_case("llama-7b:64")


def test_kv4_prefill_bench_cases_parse():
    from bench.kv4_prefill import DEFAULT_CASES, parse_case
    assert parse_case("llama-3-8b:4:512:3584") == ("llama-3-8b", 4, 512, 3584)
    assert all(parse_case(c)[0] in ("llama-7b", "llama-3-8b") for c in DEFAULT_CASES)
    for bad in ("llama-7b:4:512", "mistral:1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError, match="layout:batch:new:prefix"):
            parse_case(bad)


if __name__ == "__main__":
    from sanitize import run_if_asked
    run_if_asked(sanitize_main)

