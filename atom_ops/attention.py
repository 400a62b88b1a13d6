"""The INT4 KV cache's ops: store new K/V rows, decode attention, and the prefill gather.

One layer's pool is three tensors, as models/engine/kv_cache.py KV4Pages holds them, head-major
within each page (token slot s = page * page_size + offset):

    packed  uint8   [pages, kv_heads, page_size, head_dim / 2]   unsigned nibbles (formats.pack_uint4)
    scale   float16 [pages, kv_heads, page_size, G]               G = head_dim / group
    zero    float16 [pages, kv_heads, page_size, G]

so token s of kv head h is [s // page_size, h, s % page_size]: a page's tokens of one head are
contiguous (a 32-token tile's scales are 64 * G contiguous bytes per tensor, not 32 sectors).
value = nibble * scale + zero (formats.quantize_kv / dequantize_kv); the group is head_dim / G.

    kv4_append(k, v, slots, k_pool, v_pool, cos=None, sin=None)
        k, v [N, kv_heads, head_dim] into slots [N] (int64). With cos, sin [N, head_dim] RoPE is
        applied to k first (HF layout: x * cos + rotate_half(x) * sin, rounded in k's dtype as torch
        rounds it). Bit-exact with kv4_append_reference.
    kv4_decode_attention(q, k_pool, v_pool, block_tables, context_lens, splits=0) -> [B, Hq, head_dim]
        One query token per row, q [B, Hq, head_dim], over the row's first context_lens[b] cached
        tokens (0: a zero row); block_tables [B, W] and context_lens [B] int32 or int64. Softmax
        scale head_dim^-0.5; GQA: query head h reads kv head h // (Hq / Hkv). float32 accumulation
        (the tensor-core kernel rounds dequantized V and the probabilities to float16 for its MMAs).
    kv4_gather(k_pool, v_pool, block_tables, dtype) -> k, v [B, kv_heads, W * page_size, head_dim]
        The dequantized pages in `dtype`, bit-exact with formats.dequantize_kv(...).to(dtype).

The fp16 / fp8 serving modes' cache has plain pages (models/engine/kv_cache.py FloatPages); their
decode attention is the same flash-decoding kernel over float rows:

    paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, splits=0) -> [B, Hq, head_dim]
        k_pool, v_pool: one layer of FloatPages' pools, [pages, page_size, kv_heads, head_dim] contiguous,
        in q's dtype (float16 or bfloat16; slot s = page * page_size + offset, as above). Same contract
        as kv4_decode_attention otherwise (q [B, Hq, head_dim], block_tables [B, W] and context_lens [B]
        int32 or int64, 0 gives a zero row, scale head_dim^-0.5, GQA h // (Hq / Hkv), decode_splits'
        rule, no host sync: CUDA-graph safe). Kernel: mma.sync in q's dtype with float32 accumulation
        (probabilities rounded to q's dtype for the P . V MMA); reference: paged_decode_reference.

Decode has two kernels: a tensor-core one (mma.sync m16n8k16, fp32 accumulation; sm_80+: q . K and
P . V on the raw nibbles (exact fp16 subnormals), K's scale and zero applied to the scores in fp32,
V's folded into P (p * scale rounded to fp16) and a per-head sum of p * zero) for float16 q, and a
SIMT fp32 one, which bfloat16 q always takes. The environment variable ATOM_KV4_DECODE=simt|mma forces one (read at each call; `mma`
applies to float16 q only) for benchmarking and tests; unset or `auto` is the default choice.
Both use the same split rule, workspace and combine kernel. The tensor-core kernel's memory pipeline
depth (cp.async stages per warp, default 2: 3 and 4 measured no faster on the H100) can be forced
with ATOM_KV4_STAGES=2|3|4 (read at each call; same results, for A/B benchmarks).

    kv4_prefill_attention(q, k_pool, v_pool, block_tables, context_lens) -> [B, Hq, T, head_dim]
        Causal prefill attention: q [B, Hq, T, head_dim] (already RoPE'd) holds T new tokens per row
        whose K and V are already in the pages (kv4_append first: "store first, then read everything
        back"); query t of row b sits at position context_lens[b] - T + t and sees keys 0..that position
        (of the W * page_size its block-table row covers; none: a zero row). Scale head_dim^-0.5, GQA as
        decode. One fused FlashAttention-2 style kernel (mma.sync, K and V tiles of the pages
        dequantized in registers, online softmax in float32; P rounded to q's dtype for the P . V MMA).
        Tested on the H100 (120 shapes against kv4_prefill_attention_reference, memcheck) but on
        the H100 0.39-0.68x the speed of kv4_gather + SDPA (torch's FlashAttention) for prompts without
        a cached prefix, 1.0-1.2x with a long one (`python -m bench.kv4_prefill`): each warp dequantizes
        every K / V tile for its 16 rows, 4x the work of dequantizing a tile once per CTA.

Prefill attention (T > 1 new tokens per row) in the engine is, by default, kv4_gather followed by
torch's F.scaled_dot_product_attention over the dequantized prefix plus the new tokens
(models/engine/attention.py); ATOM_KV4_PREFILL=kernel switches it to kv4_prefill_attention (opt-in
until the kernel has been validated on a GPU). Decode (T = 1) is kv4_decode_attention.

On CUDA tensors with the compiled extension the kernels run (attention.cu); on CPU tensors or
without the extension the pure-torch references run. The kernels take head_dim 64 or 128, group
32, 64 or 128, Hq / Hkv in 1..8 and float16 / bfloat16 (`kernel_limits` names what is outside);
the references take any. Arguments are checked before any launch (FormatError). Decode does no host
sync: its split count is a function of shapes and the SM count only, so it can be captured in a
CUDA graph.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from . import formats
from .formats import FormatError
from .rope import rotate_half
from .registration import atom_op

Pool = tuple[Tensor, Tensor, Tensor]  # (packed, scale, zero) of one layer

KV4_TILE = 128          # tokens per decode tile (attention.cu kTile): splits cover whole tiles
HEAD_DIMS = (64, 128)
GROUPS = (32, 64, 128)
MAX_GQA = 8             # query heads per kv head the decode kernel holds
SPLIT_TARGET = 4        # decode CTAs per SM the split rule fills (the tensor-core kernel's occupancy)
DECODE_KERNEL_ENV = "ATOM_KV4_DECODE"  # simt | mma: force one decode kernel (benchmarking)
DECODE_STAGES_ENV = "ATOM_KV4_STAGES"  # 2 | 3 | 4: force the tensor-core kernel's cp.async stages (benchmarking)
DECODE_STAGES = (2, 3, 4)
PREFILL_ENV = "ATOM_KV4_PREFILL"        # kernel | gather (default): the engine's KV4 prefill path
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
_INDEX_DTYPES = (torch.int32, torch.int64)


# ------------------------------------------------------------------------- references

def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, H, D], cos/sin [N, D]: HF's RoPE x * cos + rotate_half(x) * sin, each op in x's dtype."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def pool_group(pool: Pool) -> int:
    packed, scale, _ = pool
    return 2 * packed.shape[-1] // scale.shape[-1]


def kv4_append_reference(k: Tensor, v: Tensor, slots: Tensor, k_pool: Pool, v_pool: Pool,
                         cos: Tensor | None = None, sin: Tensor | None = None) -> None:
    """RoPE on k (when cos is given), formats.quantize_kv, and a write into the pools' slots."""
    if cos is not None:
        k = rope_reference(k, cos, sin)
    group = pool_group(k_pool)
    page_size = k_pool[0].shape[2]
    page, offset = slots // page_size, slots % page_size
    for pool, x in ((k_pool, k), (v_pool, v)):
        for t, part in zip(pool, formats.quantize_kv(x, group)):  # part [N, kv_heads, ...]
            t[page, :, offset] = part  # advanced indices apart: the result is [N, kv_heads, ...]


def _dequantized(pool: Pool, block_tables: Tensor) -> Tensor:
    """float32 [B, kv_heads, W * page_size, head_dim] of each row's pages."""
    B, W = block_tables.shape
    # [B, W, Hkv, page_size, ...] -> [B, W * page_size, Hkv, ...] (dequantize_kv's token-major layout)
    parts = [t[block_tables].transpose(2, 3).reshape(B, W * t.shape[2], t.shape[1], t.shape[3]) for t in pool]
    return formats.dequantize_kv(*parts, pool_group(pool)).transpose(1, 2)


def kv4_gather_reference(k_pool: Pool, v_pool: Pool, block_tables: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    k, v = (_dequantized(p, block_tables).to(dtype).contiguous() for p in (k_pool, v_pool))
    return k, v


def kv4_decode_reference(q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor,
                         context_lens: Tensor) -> Tensor:
    """The paged-attention math for one query token per row, in float32 from the dequantized cache."""
    k, v = _dequantized(k_pool, block_tables), _dequantized(v_pool, block_tables)  # [B, Hkv, L, D]
    return _decode_math(q, k, v, context_lens)


def kv4_prefill_attention_reference(q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor,
                                    context_lens: Tensor) -> Tensor:
    """kv4_prefill_attention's math: the dequantized pages (kv4_gather's values, in float32), causal
    masked softmax attention of q [B, Hq, T, D] in float32 -> q's dtype; rows seeing no key are zeros."""
    k, v = _dequantized(k_pool, block_tables), _dequantized(v_pool, block_tables)  # [B, Hkv, L, D]
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, T, D)  # query head h = g * R + r reads kv head g
    scores = torch.einsum("bgrtd,bgld->bgrtl", qf, k) * D ** -0.5
    pos = context_lens.to(q.device).long()[:, None] - T + torch.arange(T, device=q.device)[None, :]  # [B, T]
    visible = torch.arange(L, device=q.device)[None, None, :] <= pos[:, :, None]                   # [B, T, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bgrtl,bgld->bgrtd", p, v).reshape(B, Hq, T, D).to(q.dtype)


def _gathered(pool: Tensor, block_tables: Tensor) -> Tensor:
    """float32 [B, kv_heads, W * page_size, head_dim] of each row's float pages."""
    B, W = block_tables.shape
    x = pool[block_tables]  # [B, W, page_size, Hkv, D]
    return x.reshape(B, W * pool.shape[1], *pool.shape[2:]).transpose(1, 2).float()


def paged_decode_reference(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                           context_lens: Tensor) -> Tensor:
    """paged_decode_attention's math: gather the pages, masked softmax, all in float32."""
    return _decode_math(q, _gathered(k_pool, block_tables), _gathered(v_pool, block_tables), context_lens)


def _decode_math(q: Tensor, k: Tensor, v: Tensor, context_lens: Tensor) -> Tensor:
    """Attention of q [B, Hq, D] over float32 k, v [B, Hkv, L, D], row b seeing its first context_lens[b]."""
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qf = q.float().reshape(B, Hkv, Hq // Hkv, D)  # query head h = g * R + r reads kv head g
    scores = torch.einsum("bgrd,bgld->bgrl", qf, k) * D ** -0.5
    visible = torch.arange(L, device=q.device)[None, :] < context_lens.to(q.device)[:, None]  # [B, L]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible token: zeros
    return torch.einsum("bgrl,bgld->bgrd", p, v).reshape(B, Hq, D).to(q.dtype)


# ---------------------------------------------------------------------- argument checks

def kernel_limits(head_dim: int, group: int, dtype: torch.dtype, q_heads: int | None = None,
                  kv_heads: int | None = None) -> str | None:
    """Why the CUDA kernels cannot run this shape, or None when they can."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} is not one of {HEAD_DIMS}"
    if group not in GROUPS or head_dim % group:
        return f"group {group} is not one of {GROUPS} dividing head_dim {head_dim}"
    if dtype not in _DTYPE_CODE:
        return f"dtype {dtype} is not float16 or bfloat16"
    if q_heads is not None and kv_heads and q_heads // kv_heads > MAX_GQA:
        return f"{q_heads} query heads over {kv_heads} kv heads: more than {MAX_GQA} per kv head"
    return None


@functools.cache
def _extension_has(entry_point: str) -> bool:
    from .kernels import extension  # late: the extension loads on first use
    ext = extension()
    return ext is not None and hasattr(ext, entry_point)


def kernels_available() -> bool:
    """The compiled extension is there and has the KV4 entry points."""
    return _extension_has("kv4_decode_attention")


def _runs_kernel(t: Tensor) -> bool:
    return t.is_cuda and kernels_available()


def prefill_kernel_available() -> bool:
    """The compiled extension has kv4_prefill_attention (an extension built before it lacks it)."""
    return _extension_has("kv4_prefill_attention")


def _runs_prefill_kernel(t: Tensor) -> bool:
    return _runs_kernel(t) and prefill_kernel_available()


def paged_kernel_available() -> bool:
    """The compiled extension has paged_decode_attention (fp16 / bf16 pages)."""
    return _extension_has("paged_decode_attention")


def _runs_paged_kernel(t: Tensor) -> bool:
    return t.is_cuda and paged_kernel_available()


def _check_devices(op: str, **tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise FormatError(f"{op}: tensors on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return first


def pool_dims(pool: Pool, op: str, name: str) -> tuple[int, int, int, int]:
    """(page_size, kv_heads, head_dim, group) of one layer's pool after checking its three tensors."""
    if not (isinstance(pool, (tuple, list)) and len(pool) == 3):
        raise FormatError(f"{op}: {name} must be a (packed, scale, zero) tuple")
    packed, scale, zero = pool
    if packed.dtype != torch.uint8 or packed.dim() != 4:
        raise FormatError(f"{op}: {name} packed must be uint8 [pages, kv_heads, page_size, head_dim / 2] "
                          f"(head-major pages), got {packed.dtype} {tuple(packed.shape)}")
    for label, t in (("scale", scale), ("zero", zero)):
        if t.dtype != formats.SCALE_DTYPE or t.dim() != 4 or t.shape[:3] != packed.shape[:3]:
            raise FormatError(f"{op}: {name} {label} must be float16 [pages, kv_heads, page_size, groups] = "
                              f"{list(packed.shape[:3])} + [groups] to match packed, got {t.dtype} {tuple(t.shape)}")
    if scale.shape != zero.shape:
        raise FormatError(f"{op}: {name} scale {tuple(scale.shape)} and zero {tuple(zero.shape)} differ")
    head_dim, groups = 2 * packed.shape[-1], scale.shape[-1]
    if groups < 1 or head_dim % groups:
        raise FormatError(f"{op}: {name}: {groups} groups do not divide head_dim {head_dim}")
    if not all(t.is_contiguous() for t in pool):
        raise FormatError(f"{op}: {name} tensors must be contiguous (one layer of a contiguous pool)")
    _check_devices(op, packed=packed, scale=scale, zero=zero)
    return packed.shape[2], packed.shape[1], head_dim, head_dim // groups


def _pools(k_pool: Pool, v_pool: Pool, op: str) -> tuple[int, int, int, int]:
    dims = pool_dims(k_pool, op, "k_pool")
    if pool_dims(v_pool, op, "v_pool") != dims or v_pool[0].shape != k_pool[0].shape:
        raise FormatError(f"{op}: k_pool {tuple(k_pool[0].shape)} and v_pool {tuple(v_pool[0].shape)} "
                          "have different shapes or groups")
    return dims


def _kernel_check(op: str, t: Tensor, *limits) -> None:
    if _runs_kernel(t):
        why = kernel_limits(*limits)
        if why:
            raise FormatError(f"{op}: the CUDA kernel cannot run this call: {why}")


def _check_index(op: str, name: str, t: Tensor, dims: int) -> None:
    if t.dtype not in _INDEX_DTYPES or t.dim() != dims:
        raise FormatError(f"{op}: {name} must be a {dims}-D int32 or int64 tensor, got {t.dtype} {tuple(t.shape)}")


def check_append_args(k, v, slots, k_pool, v_pool, cos, sin) -> None:
    op = "kv4_append"
    page_size, kv_heads, head_dim, group = _pools(k_pool, v_pool, op)
    if k.dim() != 3 or k.shape[1:] != (kv_heads, head_dim) or v.shape != k.shape:
        raise FormatError(f"{op}: k and v must be [N, {kv_heads}, {head_dim}] to match the pool, got "
                          f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not k.is_floating_point() or v.dtype != k.dtype:
        raise FormatError(f"{op}: k and v must share one floating dtype, got {k.dtype} and {v.dtype}")
    if slots.dtype != torch.int64 or slots.shape != (k.shape[0],):
        raise FormatError(f"{op}: slots must be int64 [{k.shape[0]}], got {slots.dtype} {tuple(slots.shape)}")
    if (cos is None) != (sin is None):
        raise FormatError(f"{op}: pass cos and sin together")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (k.shape[0], head_dim) or t.dtype != k.dtype:
                raise FormatError(f"{op}: {name} must be {k.dtype} [{k.shape[0]}, {head_dim}], "
                                  f"got {t.dtype} {tuple(t.shape)}")
    _check_devices(op, k=k, v=v, slots=slots, cos=cos, sin=sin, pool=k_pool[0], v_pool=v_pool[0])
    _kernel_check(op, k, head_dim, group, k.dtype)
    if _runs_kernel(k) and k_pool[0].shape[0] * page_size * kv_heads >= 2 ** 31:
        raise FormatError(f"{op}: the pool has >= 2^31 token rows (pages * kv_heads * page_size)")


def check_decode_args(q, k_pool, v_pool, block_tables, context_lens) -> None:
    op = "kv4_decode_attention"
    page_size, kv_heads, head_dim, group = _pools(k_pool, v_pool, op)
    if not q.is_floating_point():
        raise FormatError(f"{op}: q must be floating point, got {q.dtype}")
    _check_decode_rows(op, q, block_tables, context_lens, head_dim, kv_heads)
    _check_devices(op, q=q, block_tables=block_tables, context_lens=context_lens, k_pool=k_pool[0], v_pool=v_pool[0])
    _kernel_check(op, q, head_dim, group, q.dtype, q.shape[1], kv_heads)
    if _runs_kernel(q) and k_pool[0].shape[0] * page_size * kv_heads >= 2 ** 31:
        raise FormatError(f"{op}: the CUDA kernel cannot run this call: the pool has >= 2^31 token rows "
                          "(pages * kv_heads * page_size)")


def _check_decode_rows(op: str, q: Tensor, block_tables: Tensor, context_lens: Tensor, head_dim: int,
                       kv_heads: int) -> None:
    """q [B, q_heads, head_dim] with q_heads a multiple of kv_heads, and index tensors of B rows."""
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise FormatError(f"{op}: q must be [B, q_heads, {head_dim}] (one token per row), got {tuple(q.shape)}")
    _check_heads_and_rows(op, q, block_tables, context_lens, kv_heads)


def _check_heads_and_rows(op: str, q: Tensor, block_tables: Tensor, context_lens: Tensor, kv_heads: int) -> None:
    """q's dim 1 (query heads) a positive multiple of kv_heads; index tensors with q's batch rows."""
    if kv_heads == 0 or q.shape[1] % kv_heads or q.shape[1] == 0:
        raise FormatError(f"{op}: q_heads ({q.shape[1]}) must be a positive multiple of kv_heads ({kv_heads})")
    _check_index(op, "block_tables", block_tables, 2)
    _check_index(op, "context_lens", context_lens, 1)
    if block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise FormatError(f"{op}: block_tables {tuple(block_tables.shape)} and context_lens "
                          f"{tuple(context_lens.shape)} must have q's batch {q.shape[0]} rows")


def check_prefill_args(q, k_pool, v_pool, block_tables, context_lens) -> None:
    op = "kv4_prefill_attention"
    page_size, kv_heads, head_dim, group = _pools(k_pool, v_pool, op)
    if not q.is_floating_point():
        raise FormatError(f"{op}: q must be floating point, got {q.dtype}")
    if q.dim() != 4 or q.shape[3] != head_dim:
        raise FormatError(f"{op}: q must be [B, q_heads, T, {head_dim}] (T new tokens per row), got {tuple(q.shape)}")
    _check_heads_and_rows(op, q, block_tables, context_lens, kv_heads)
    _check_devices(op, q=q, block_tables=block_tables, context_lens=context_lens, k_pool=k_pool[0], v_pool=v_pool[0])
    _kernel_check(op, q, head_dim, group, q.dtype, q.shape[1], kv_heads)
    if _runs_kernel(q):
        why = None
        if k_pool[0].shape[0] * page_size * kv_heads >= 2 ** 31:
            why = "the pool has >= 2^31 token rows (pages * kv_heads * page_size)"
        elif q.shape[0] > 65535 or kv_heads > 65535:
            why = f"batch {q.shape[0]} or kv_heads {kv_heads} above 65535"
        elif q.shape[2] * (q.shape[1] // kv_heads) > 2 ** 30:
            why = f"T * q_heads / kv_heads = {q.shape[2] * (q.shape[1] // kv_heads)} above 2^30"
        if why:
            raise FormatError(f"{op}: the CUDA kernel cannot run this call: {why}")


def check_paged_decode_args(q, k_pool, v_pool, block_tables, context_lens) -> None:
    op = "paged_decode_attention"
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise FormatError(f"{op}: {name} must be a 4-D tensor [pages, page_size, kv_heads, head_dim], "
                              f"got {type(t).__name__} {tuple(t.shape) if isinstance(t, Tensor) else ''}")
        if not t.is_contiguous():
            raise FormatError(f"{op}: {name} must be contiguous (one layer of a contiguous pool)")
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        raise FormatError(f"{op}: k_pool {k_pool.dtype} {tuple(k_pool.shape)} and v_pool {v_pool.dtype} "
                          f"{tuple(v_pool.shape)} differ")
    _, page_size, kv_heads, head_dim = k_pool.shape
    if not q.is_floating_point() or q.dtype != k_pool.dtype:
        raise FormatError(f"{op}: q and the pools must share one floating dtype, got q {q.dtype}, "
                          f"pools {k_pool.dtype}")
    _check_decode_rows(op, q, block_tables, context_lens, head_dim, kv_heads)
    _check_devices(op, q=q, block_tables=block_tables, context_lens=context_lens, k_pool=k_pool, v_pool=v_pool)
    if _runs_paged_kernel(q):
        why = kernel_limits(head_dim, head_dim, q.dtype, q.shape[1], kv_heads)  # group: any valid one
        if why is None and k_pool.shape[0] * page_size >= 2 ** 31:
            why = "the pool has >= 2^31 slots"
        if why is None and (k_pool.data_ptr() % 16 or v_pool.data_ptr() % 16):
            why = "the pools must be 16-byte aligned"
        if why:
            raise FormatError(f"{op}: the CUDA kernel cannot run this call: {why}")


def check_gather_args(k_pool, v_pool, block_tables, dtype) -> None:
    op = "kv4_gather"
    page_size, kv_heads, head_dim, group = _pools(k_pool, v_pool, op)
    _check_index(op, "block_tables", block_tables, 2)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FormatError(f"{op}: dtype must be a floating torch.dtype, got {dtype}")
    _check_devices(op, block_tables=block_tables, k_pool=k_pool[0], v_pool=v_pool[0])
    _kernel_check(op, block_tables, head_dim, group, dtype)
    if _runs_kernel(block_tables) and k_pool[0].shape[0] * page_size * kv_heads >= 2 ** 31:
        raise FormatError(f"{op}: the CUDA kernel cannot run this call: the pool has >= 2^31 token rows "
                          "(pages * kv_heads * page_size)")


# --------------------------------------------------------------------- kernel launches
# Arguments checked by the public functions; `ext` is the compiled module, `stream` a raw handle.

@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def decode_splits(batch: int, kv_heads: int, max_len: int, sms: int) -> int:
    """CTAs per (row, kv head) for decode, each over whole 128-token tiles, no split left empty at
    full width: as many splits as still fit one wave of SPLIT_TARGET CTAs per SM, and no more (a
    partial second wave costs more than the extra CTAs gain). Depends on shapes and the SM count
    only (never on context_lens), so a captured CUDA graph stays valid for any lengths. Measured on
    the H100 (`python -m bench.kv4_splits`, every forced split count): Llama-3-8B batch 64 (512
    pairs) is 1.07-1.16x faster with 1 split than with the 2 a rounded-up rule gave; beyond one
    wave (Llama-7B batch 64 / 256, Llama-3-8B batch 256) 1 split was the fastest count."""
    tiles = max(1, math.ceil(max_len / KV4_TILE))
    want = max(1, SPLIT_TARGET * sms // max(1, batch * kv_heads))
    per_split = math.ceil(tiles / max(1, min(tiles, want)))
    return math.ceil(tiles / per_split)


def decode_kernel_code(dtype: torch.dtype) -> int:
    """The decode kernel for q of `dtype` (attention.cu KV4DecodeArgs.kernel): 2 the tensor-core
    kernel (float16 q), 1 the SIMT kernel; ATOM_KV4_DECODE=simt|mma forces one (mma: float16 q only,
    bfloat16 stays on SIMT)."""
    force = os.environ.get(DECODE_KERNEL_ENV, "").strip().lower()
    if force not in ("", "auto", "simt", "mma"):
        raise FormatError(f"{DECODE_KERNEL_ENV}={force!r}: expected simt, mma or auto")
    if force == "simt" or dtype != torch.float16:
        return 1
    return 2


def decode_stages() -> int:
    """The tensor-core decode kernel's cp.async stages per warp (attention.cu KV4DecodeArgs.stages): 0
    lets the launcher choose (2 stages);
    ATOM_KV4_STAGES=2|3|4 forces one (read at each call, like ATOM_KV4_DECODE). The stage count
    changes the memory pipeline only: results are identical."""
    force = os.environ.get(DECODE_STAGES_ENV, "").strip().lower()
    if force in ("", "auto", "0"):
        return 0
    if force not in tuple(str(s) for s in DECODE_STAGES):
        raise FormatError(f"{DECODE_STAGES_ENV}={force!r}: expected 2, 3, 4 or auto")
    return int(force)


def prefill_uses_kernel() -> bool:
    """Whether the engine's KV4 prefill (T > 1) runs kv4_prefill_attention: only with ATOM_KV4_PREFILL=kernel
    (read at each call) and an extension that has it. The default (unset or `gather`) is kv4_gather + SDPA,
    which is faster on the H100 for prompts without a long cached prefix (module doc)."""
    force = os.environ.get(PREFILL_ENV, "").strip().lower()
    if force not in ("", "gather", "kernel"):
        raise FormatError(f"{PREFILL_ENV}={force!r}: expected kernel or gather")
    return force == "kernel" and prefill_kernel_available()


def _ptrs(pool: Pool) -> list[int]:
    return [t.data_ptr() for t in pool]


def _launch_append(ext, k, v, slots, k_pool, v_pool, cos, sin, stream: int) -> None:
    n, kv_heads, head_dim = k.shape
    if n == 0:
        return
    k, v = (x if x.stride(2) == 1 and x.stride(1) == head_dim else x.contiguous() for x in (k, v))
    ld_rope = 0
    if cos is not None:
        if not (cos.stride(1) == 1 and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0)):
            cos, sin = cos.contiguous(), sin.contiguous()
        ld_rope = cos.stride(0) if n > 1 else head_dim  # a size-1 dim's stride means nothing
    ld_k, ld_v = (x.stride(0) if n > 1 else kv_heads * head_dim for x in (k, v))
    packed = k_pool[0]
    ext.kv4_append(k.data_ptr(), v.data_ptr(), ld_k, ld_v, cos.data_ptr() if cos is not None else 0,
                   sin.data_ptr() if sin is not None else 0, ld_rope, slots.contiguous().data_ptr(),
                   _DTYPE_CODE[k.dtype], n, kv_heads, head_dim, pool_group(k_pool), packed.shape[0] * packed.shape[2],
                   packed.shape[2], *_ptrs(k_pool), *_ptrs(v_pool), stream)


def _decode_operands(q, block_tables, context_lens, kv_heads: int, page_size: int, splits: int, sms: int):
    """-> (out, operands) for both decode launchers: operands = (q, tables, lens, splits, workspace) in
    the layouts the kernels read (q rows and table rows contiguous), the split count from the
    shapes-only rule unless forced, and the split workspace; operands is None when there is nothing
    to attend (out is then zeroed)."""
    B, q_heads, head_dim = q.shape
    out = torch.empty((B, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if B == 0 or block_tables.shape[1] == 0:
        return out.zero_(), None
    if not (q.stride(2) == 1 and q.stride(1) == head_dim):
        q = q.contiguous()
    tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    splits = splits or decode_splits(B, kv_heads, block_tables.shape[1] * page_size, sms)
    ws = torch.empty(B * q_heads * splits * (head_dim + 2), dtype=torch.float32, device=q.device) if splits > 1 else None
    return out, (q, tables, context_lens.contiguous(), splits, ws)


def _launch_decode(ext, q, k_pool, v_pool, block_tables, context_lens, splits: int, sms: int, stream: int) -> Tensor:
    B, q_heads, head_dim = q.shape
    kv_heads, page_size = k_pool[0].shape[1], k_pool[0].shape[2]
    W = block_tables.shape[1]
    out, operands = _decode_operands(q, block_tables, context_lens, kv_heads, page_size, splits, sms)
    if operands is None:
        return out
    q, tables, lens, splits, ws = operands
    ext.kv4_decode_attention(q.data_ptr(), q.stride(0), q.stride(1), _DTYPE_CODE[q.dtype], *_ptrs(k_pool),
                             *_ptrs(v_pool), tables.data_ptr(), tables.stride(0), int(tables.dtype == torch.int64),
                             lens.data_ptr(), int(lens.dtype == torch.int64), B, q_heads, kv_heads, head_dim,
                             pool_group(k_pool), page_size, W, head_dim ** -0.5, splits,
                             ws.data_ptr() if ws is not None else 0, out.data_ptr(), stream,
                             decode_kernel_code(q.dtype), decode_stages())
    return out


def _launch_paged_decode(ext, q, k_pool, v_pool, block_tables, context_lens, splits: int, sms: int,
                         stream: int) -> Tensor:
    B, q_heads, head_dim = q.shape
    pages, page_size, kv_heads, _ = k_pool.shape
    W = block_tables.shape[1]
    out, operands = _decode_operands(q, block_tables, context_lens, kv_heads, page_size, splits, sms)
    if operands is None:
        return out
    q, tables, lens, splits, ws = operands
    ext.paged_decode_attention(q.data_ptr(), q.stride(0), q.stride(1), _DTYPE_CODE[q.dtype], k_pool.data_ptr(),
                               v_pool.data_ptr(), pages * page_size, tables.data_ptr(), tables.stride(0),
                               int(tables.dtype == torch.int64), lens.data_ptr(), int(lens.dtype == torch.int64),
                               B, q_heads, kv_heads, head_dim, page_size, W, head_dim ** -0.5, splits,
                               ws.data_ptr() if ws is not None else 0, out.data_ptr(), stream)
    return out


def _launch_gather(ext, k_pool, v_pool, block_tables, dtype, stream: int) -> tuple[Tensor, Tensor]:
    kv_heads, page_size, head_dim = k_pool[0].shape[1], k_pool[0].shape[2], 2 * k_pool[0].shape[3]
    B, W = block_tables.shape
    shape = (B, kv_heads, W * page_size, head_dim)
    k = torch.empty(shape, dtype=dtype, device=block_tables.device)
    v = torch.empty_like(k)
    if B * W == 0:
        return k, v
    tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    ext.kv4_gather(*_ptrs(k_pool), *_ptrs(v_pool), tables.data_ptr(), tables.stride(0),
                   int(tables.dtype == torch.int64), B, kv_heads, head_dim, pool_group(k_pool), page_size, W,
                   _DTYPE_CODE[dtype], k.data_ptr(), v.data_ptr(), stream)
    return k, v


def _launch_prefill(ext, q, k_pool, v_pool, block_tables, context_lens, stream: int) -> Tensor:
    B, q_heads, T, head_dim = q.shape
    kv_heads, page_size = k_pool[0].shape[1], k_pool[0].shape[2]
    W = block_tables.shape[1]
    out = torch.empty((B, q_heads, T, head_dim), dtype=q.dtype, device=q.device)
    if B * T == 0:
        return out
    if W == 0:
        return out.zero_()
    if q.stride(3) != 1:
        q = q.contiguous()
    tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    lens = context_lens.contiguous()
    ext.kv4_prefill_attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), _DTYPE_CODE[q.dtype],
                              *_ptrs(k_pool), *_ptrs(v_pool), tables.data_ptr(), tables.stride(0),
                              int(tables.dtype == torch.int64), lens.data_ptr(), int(lens.dtype == torch.int64), B,
                              q_heads, kv_heads, T, head_dim, pool_group(k_pool), page_size, W, head_dim ** -0.5,
                              out.data_ptr(), stream)
    return out


def _call(t: Tensor, launch, *args):
    """Run a launch helper on t's device and current stream with the extension's errors as FormatError."""
    from .kernels import extension, on_device, raw_stream
    dev = t.device
    with on_device(dev):
        try:
            return launch(extension(), *args, raw_stream(dev))
        except ValueError as e:
            raise FormatError(str(e)) from None


# ----------------------------------------------------------------------------- the ops

@atom_op("kv4_append", mutates_args=("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero"))
def _kv4_append_op(k: Tensor, v: Tensor, slots: Tensor, cos: Tensor | None, sin: Tensor | None, k_packed: Tensor,
                   k_scale: Tensor, k_zero: Tensor, v_packed: Tensor, v_scale: Tensor, v_zero: Tensor) -> None:
    k_pool, v_pool = (k_packed, k_scale, k_zero), (v_packed, v_scale, v_zero)
    if _runs_kernel(k):
        _call(k, _launch_append, k, v, slots, k_pool, v_pool, cos, sin)
        for t in k_pool + v_pool:  # written by pointer: tell autograd, as torch's in-place ops do
            torch.autograd.graph.increment_version(t)
    else:
        kv4_append_reference(k, v, slots, k_pool, v_pool, cos, sin)


@torch.library.register_fake("atom::kv4_append")
def _(k, v, slots, cos, sin, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero):
    return None


@atom_op("kv4_decode_attention")
def _kv4_decode_op(q: Tensor, k_packed: Tensor, k_scale: Tensor, k_zero: Tensor, v_packed: Tensor, v_scale: Tensor,
                   v_zero: Tensor, block_tables: Tensor, context_lens: Tensor, splits: int) -> Tensor:
    k_pool, v_pool = (k_packed, k_scale, k_zero), (v_packed, v_scale, v_zero)
    if _runs_kernel(q):
        return _call(q, _launch_decode, q, k_pool, v_pool, block_tables, context_lens, splits, _device_sms(q.device))
    return kv4_decode_reference(q, k_pool, v_pool, block_tables, context_lens)


@torch.library.register_fake("atom::kv4_decode_attention")
def _(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, block_tables, context_lens, splits):
    return q.new_empty(q.shape)


@atom_op("paged_decode_attention")
def _paged_decode_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor,
                     splits: int) -> Tensor:
    if _runs_paged_kernel(q):
        return _call(q, _launch_paged_decode, q, k_pool, v_pool, block_tables, context_lens, splits,
                     _device_sms(q.device))
    return paged_decode_reference(q, k_pool, v_pool, block_tables, context_lens)


@torch.library.register_fake("atom::paged_decode_attention")
def _(q, k_pool, v_pool, block_tables, context_lens, splits):
    return q.new_empty(q.shape)


@atom_op("kv4_gather")
def _kv4_gather_op(k_packed: Tensor, k_scale: Tensor, k_zero: Tensor, v_packed: Tensor, v_scale: Tensor,
                   v_zero: Tensor, block_tables: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    k_pool, v_pool = (k_packed, k_scale, k_zero), (v_packed, v_scale, v_zero)
    if _runs_kernel(block_tables):
        return _call(block_tables, _launch_gather, k_pool, v_pool, block_tables, dtype)
    return kv4_gather_reference(k_pool, v_pool, block_tables, dtype)


@torch.library.register_fake("atom::kv4_gather")
def _(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, block_tables, dtype):
    B, W = block_tables.shape
    shape = (B, k_packed.shape[1], W * k_packed.shape[2], 2 * k_packed.shape[3])
    return k_packed.new_empty(shape, dtype=dtype), k_packed.new_empty(shape, dtype=dtype)


@atom_op("kv4_prefill_attention")
def _kv4_prefill_op(q: Tensor, k_packed: Tensor, k_scale: Tensor, k_zero: Tensor, v_packed: Tensor,
                    v_scale: Tensor, v_zero: Tensor, block_tables: Tensor, context_lens: Tensor) -> Tensor:
    k_pool, v_pool = (k_packed, k_scale, k_zero), (v_packed, v_scale, v_zero)
    if _runs_prefill_kernel(q):
        return _call(q, _launch_prefill, q, k_pool, v_pool, block_tables, context_lens)
    return kv4_prefill_attention_reference(q, k_pool, v_pool, block_tables, context_lens)


@torch.library.register_fake("atom::kv4_prefill_attention")
def _(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, block_tables, context_lens):
    return q.new_empty(q.shape)


def kv4_append(k: Tensor, v: Tensor, slots: Tensor, k_pool: Pool, v_pool: Pool, cos: Tensor | None = None,
               sin: Tensor | None = None) -> None:
    """(RoPE on k +) INT4 quantization of k, v [N, kv_heads, head_dim] into the pools' slots [N] (module doc)."""
    check_append_args(k, v, slots, k_pool, v_pool, cos, sin)
    _kv4_append_op(k, v, slots, cos, sin, *k_pool, *v_pool)


def kv4_decode_attention(q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor, context_lens: Tensor,
                         splits: int = 0) -> Tensor:
    """Decode attention of q [B, Hq, head_dim] over the paged KV4 cache -> [B, Hq, head_dim] in q's dtype.
    `splits` forces the kernel's split count (0: decode_splits' rule; the reference ignores it)."""
    check_decode_args(q, k_pool, v_pool, block_tables, context_lens)
    if splits < 0:
        raise FormatError(f"kv4_decode_attention: splits must be >= 0, got {splits}")
    return _kv4_decode_op(q, *k_pool, *v_pool, block_tables, context_lens, int(splits))


def kv4_gather(k_pool: Pool, v_pool: Pool, block_tables: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Dequantized K and V [B, kv_heads, W * page_size, head_dim] in `dtype` of block_tables [B, W]'s pages."""
    check_gather_args(k_pool, v_pool, block_tables, dtype)
    return _kv4_gather_op(*k_pool, *v_pool, block_tables, dtype)


def kv4_prefill_attention(q: Tensor, k_pool: Pool, v_pool: Pool, block_tables: Tensor,
                          context_lens: Tensor) -> Tensor:
    """Causal prefill attention of q [B, Hq, T, head_dim] (T new tokens per row, their K and V already
    appended) over the paged KV4 cache -> [B, Hq, T, head_dim] in q's dtype (module doc). The engine
    uses it only with ATOM_KV4_PREFILL=kernel (module doc: slower than gather + SDPA on the H100 so far)."""
    check_prefill_args(q, k_pool, v_pool, block_tables, context_lens)
    return _kv4_prefill_op(q, *k_pool, *v_pool, block_tables, context_lens)


def paged_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor,
                           splits: int = 0) -> Tensor:
    """Decode attention of q [B, Hq, head_dim] over float pages k_pool, v_pool [pages, page_size, kv_heads,
    head_dim] (q's dtype) -> [B, Hq, head_dim] in q's dtype (module doc). `splits` as kv4_decode_attention."""
    check_paged_decode_args(q, k_pool, v_pool, block_tables, context_lens)
    if splits < 0:
        raise FormatError(f"paged_decode_attention: splits must be >= 0, got {splits}")
    return _paged_decode_op(q, k_pool, v_pool, block_tables, context_lens, int(splits))
