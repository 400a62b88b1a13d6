"""Attention over the paged KV cache, and the per-step batch the model sees.

`paged_attention` takes everything as tensors of fixed shape for a given batch size and
block-table width, with no host syncs, so it also runs inside a captured CUDA graph. Its paths:
- KV4 pages on a GPU whose shape the kernels take (atom_ops.attention): decode (one new token per
  row) is the KV4 decode-attention kernel; prefill (T > 1) is the KV4 gather kernel (pages ->
  contiguous fp16/bf16 K and V) followed by torch's scaled_dot_product_attention, i.e. prefill
  compute is SDPA over the dequantized prefix plus the new tokens. With ATOM_KV4_PREFILL=kernel
  prefill is instead the fused kv4_prefill_attention kernel (FlashAttention-2 style straight from
  the pages); opt-in: on the H100 it is slower than gather + SDPA except with a long cached prefix.
- float pages on a GPU whose shape the kernel takes: decode is atom_ops' paged decode-attention
  kernel (same design as the KV4 one, fp16/bf16 rows), prefill reads the pages back for SDPA.
- otherwise (the CPU, other shapes): the pages read back in torch and SDPA.
SDPA runs without cuDNN (SHAPE_STABLE_BACKENDS: cuDNN compiles a plan for every new prompt length).
New k, v are stored before attending (RoPE applied to k on the way in, fused into the KV4 store
kernel on a GPU).

Prefill packs several sequences' chunks into one row of tokens (PagedBatch.segments); attention
takes them a run of equal-shaped sequences at a time (consecutive chunks with the same length and
context: one gather and one SDPA call for all of them, which matters because the host launches a
prefill step's attention per call), and a chunk that starts its sequence (no cached prefix) runs
SDPA with is_causal over exactly its tokens (the flash kernels) instead of an explicit mask.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from atom_ops.attention import (kernel_limits, kv4_decode_attention, kv4_gather, kv4_prefill_attention,
                                paged_decode_attention, prefill_uses_kernel)

from .kv_cache import pages_for


@dataclass
class PagedBatch:
    """One forward step over B sequences with T new tokens each (decode: T = 1), or, with
    `segments`, a packed prefill: one row of sum(n) tokens holding B sequences' chunks in order.

    block_tables  int64 [B, W]   page ids of each sequence (padded with the null page)
    context_lens  int64 [B]      tokens in the cache after this step's tokens are written
    slots         int64 [B * T]  cache slot of each new token, row-major over (B, T) (packed: in order)
    segments      ((n, context), ...) per sequence, host ints: packed prefill only
    """

    pages: object  # FloatPages | KV4Pages
    block_tables: Tensor
    context_lens: Tensor
    slots: Tensor
    segments: tuple[tuple[int, int], ...] | None = None

    def layer(self, index: int) -> "LayerKV":
        return LayerKV(self, index)


class LayerKV:
    """One layer's view of the batch: what llama.Attention calls with its new q, k, v."""

    def __init__(self, batch: PagedBatch, index: int):
        self.batch, self.index = batch, index

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """q [B, Hq, T, D] (after RoPE), k/v [B, Hkv, T, D] (k before RoPE), cos/sin [B, T, D]
        -> out [B, Hq, T, D]."""
        b = self.batch
        B, Hkv, T, D = k.shape
        # store first, then read everything back: new tokens attend to their own stored
        # (for KV4: quantized) values, exactly as the unpaged model with KV4Quantizer does
        b.pages.write(self.index, b.slots, k.transpose(1, 2).reshape(B * T, Hkv, D),
                      v.transpose(1, 2).reshape(B * T, Hkv, D), cos.reshape(B * T, D), sin.reshape(B * T, D))
        if b.segments is None:
            return paged_attention(q, b.pages, self.index, b.block_tables, b.context_lens)
        outs, start, Hq = [], 0, q.shape[1]
        for row, rows, n, context in equal_segment_runs(b.segments):
            # `rows` consecutive sequences with the same (n, context): one attention call of batch `rows`
            # (a step of equal-length prompts: one gather and one SDPA per layer, not one per prompt)
            tables = b.block_tables[row:row + rows, :pages_for(context, b.pages.page_size)]
            qs = q[0, :, start:start + rows * n].unflatten(1, (rows, n)).transpose(0, 1)  # [rows, Hq, n, D]
            out = paged_attention(qs, b.pages, self.index, tables, b.context_lens[row:row + rows], context)
            outs.append(out.transpose(1, 2).reshape(1, rows * n, Hq, D))
            start += rows * n
        # concatenated as [B, T, Hq, D] so that the caller's transpose + reshape to [B * T, Hq * D] is a view
        return torch.cat(outs, dim=1).transpose(1, 2)


def equal_segment_runs(segments) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive equal (n, context) segments of a packed prefill -> (first row, rows, n, context)."""
    runs = []
    for row, (n, context) in enumerate(segments):
        if runs and runs[-1][2:] == (n, context):
            first, rows, _, _ = runs[-1]
            runs[-1] = (first, rows + 1, n, context)
        else:
            runs.append((row, 1, n, context))
    return runs


# cuDNN's SDPA builds an execution plan for every new shape (H100, torch 2.11: ~50 ms at each new
# prompt length, 1.7 s for a first masked call), and a serving engine's prefill meets a new shape with
# nearly every prompt: 64 prompts of 256-1024 tokens (Llama-7B, 8 layers) took the atom mode's prefill
# phase 5.0 s with it and 0.22 s without. So the engine's SDPA calls run on torch's flash / memory-
# efficient kernels, which need no per-shape build; at equal 1024-token prompts flash is slower per
# call ([8, 32, 1024, 128]: 279 vs 160 us, bench.sdpa_backends) but the prefill steps change by less
# than their noise.
SHAPE_STABLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ENABLED = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
            SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
            SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled}


def shape_stable_sdpa():
    """``with shape_stable_sdpa():`` keeps cuDNN out of the SDPA calls inside, leaving the other
    backends as the process has them (a no-op when cuDNN is off already, or is all that is on: the
    context manager costs ~13 us of host time, so a prefill step enters it once)."""
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return nullcontext()
    allowed = [b for b in SHAPE_STABLE_BACKENDS if _ENABLED[b]()]
    return sdpa_kernel(allowed) if allowed else nullcontext()


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention without cuDNN (SHAPE_STABLE_BACKENDS)."""
    with shape_stable_sdpa():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def paged_attention(q: Tensor, pages, layer: int, block_tables: Tensor, context_lens: Tensor,
                    context: int | None = None) -> Tensor:
    """Causal attention of q [B, Hq, T, D] over each sequence's cached keys.

    Query t of row b sits at position context_lens[b] - T + t and sees keys 0..that position;
    keys past a row's context (the rest of its last page, padding pages) are masked out.
    `context` (rows that all have this context): context_lens as a host int, so the keys can be cut
    to it and a chunk with no cached prefix (T == context) needs no mask.
    """
    B, Hq, T, D = q.shape
    if (pages.kind == "float" and pages.fused and T == 1 and q.dtype == pages.dtype
            and kernel_limits(D, D, q.dtype, Hq, pages.kv_heads) is None):
        return paged_decode_attention(q[:, :, 0], pages.k[layer], pages.v[layer], block_tables,
                                      context_lens)[:, :, None]
    if pages.kind == "kv4" and pages.fused and kernel_limits(D, pages.group, q.dtype, Hq, pages.kv_heads) is None:
        k_pool, v_pool = pages.layer_pools(layer)
        if T == 1:
            return kv4_decode_attention(q[:, :, 0], k_pool, v_pool, block_tables, context_lens)[:, :, None]
        if prefill_uses_kernel():  # ATOM_KV4_PREFILL=kernel (opt-in)
            return kv4_prefill_attention(q, k_pool, v_pool, block_tables, context_lens)
        k, v = kv4_gather(k_pool, v_pool, block_tables, q.dtype)       # [B, Hkv, L, D]
    else:
        k, v = (x.transpose(1, 2) for x in pages.read(layer, block_tables))  # [B, Hkv, L, D]
    if context is not None:
        k, v = k[:, :, :context], v[:, :, :context]
    Hkv, L = k.shape[1], k.shape[2]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if T == 1 and Hq != Hkv:
        # GQA decode: the Hq / Hkv query heads of one kv head share its keys and (with one query
        # token) its mask, so they go in as that head's query rows; no copy of K and V per query head
        q_pos = context_lens[:, None, None, None] - 1                              # [B, 1, 1, 1]
        visible = torch.arange(L, device=q.device)[None, None, None, :] <= q_pos   # [B, 1, 1, L]
        out = sdpa(q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=visible, scale=D ** -0.5)
        return out.reshape(B, Hq, 1, D)
    if T == context:  # the chunk is the whole sequence so far: plain causal attention
        # GQA (each kv head serves Hq / Hkv consecutive query heads) through SDPA's enable_gqa: the
        # same bits as repeating K and V per query head, without the copy (H100, [8, 32, 1024, 128]
        # with 8 kv heads: 158 us against 311 us with the repeat)
        return sdpa(q, k, v, is_causal=True, scale=D ** -0.5, enable_gqa=Hq != Hkv)
    if Hq != Hkv:  # masked: not every masked SDPA backend takes enable_gqa, so the repeated copy
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
    q_pos = context_lens[:, None] - T + torch.arange(T, device=q.device)        # [B, T]
    visible = torch.arange(L, device=q.device)[None, None, :] <= q_pos[:, :, None]  # [B, T, L]
    return sdpa(q, k, v, attn_mask=visible[:, None], scale=D ** -0.5)
