"""The paged KV cache: a pool of fixed-size pages per layer, and who owns which page.

Every layer has the same page ids, so a sequence's block table (its list of page ids, in
order) addresses all layers at once. Token p of a sequence lives in page table[p // page_size]
at offset p % page_size; its "slot" is page * page_size + offset.

Two page formats:
- FloatPages: k and v as they are, in the model's dtype (fp16 on a GPU, fp32 on the CPU); on a GPU
  decode steps read them with atom_ops' paged decode-attention kernel (`fused`).
- KV4Pages: asymmetric INT4 per token per head with an fp16 scale and zero per group along
  head_dim, exactly `atom_ops.formats.quantize_kv` / `dequantize_kv` (the pipeline's
  KV4Quantizer), so a paged atom model sees the same K/V values as the evaluated one. Its pages
  are head-major ([pages, kv_heads, page_size, ...]: one head's tokens of a page contiguous, so
  decode reads whole sectors of scales and zeros). On a GPU
  whose shape the kernels take (`fused`), new rows are stored by atom_ops' kv4_append kernel
  (RoPE on k fused in) and attention reads the pages with the KV4 kernels (attention.py).

`write` takes k before RoPE together with cos/sin and applies RoPE to k itself.

Page 0 is never handed out: padded rows of a fixed-shape (CUDA-graph) decode batch write
into it and read from it, and nothing else does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from atom_ops import attention as attention_ops
from atom_ops import formats

from ..llama import apply_rope

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked; the scheduler checks first, so this is a bug."""


class PageAllocator:
    """Free list of page ids 1..num_pages-1 (page 0 is the null page)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages a sequence can ever hold: all but the null page."""
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)


class FloatPages:
    """K and V pages in a floating dtype: [layers, pages, page_size, kv_heads, head_dim] each."""

    kind = "float"

    def __init__(self, layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, num_pages, page_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size, self.dtype, self.kv_heads = page_size, dtype, kv_heads
        # decode steps through atom_ops' paged decode kernel when it takes this shape, else torch
        self.fused = (torch.device(device).type == "cuda" and attention_ops.paged_kernel_available()
                      and attention_ops.kernel_limits(head_dim, head_dim, dtype) is None)

    @staticmethod
    def bytes_per_page(layers: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       **_) -> int:
        return 2 * layers * page_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor, cos: Tensor | None = None,
              sin: Tensor | None = None) -> None:
        """k, v [N, kv_heads, head_dim] into flat slots [N]; with cos/sin [N, head_dim], k is taken
        before RoPE and rotated here."""
        if cos is not None:  # as [1, kv_heads, N, head_dim] for apply_rope (one kernel on a GPU)
            k = apply_rope(k.transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1)
        for pool, x in ((self.k, k), (self.v, v)):
            pool[layer].view(-1, *pool.shape[3:]).index_copy_(0, slots, x.to(pool.dtype))

    def read(self, layer: int, block_tables: Tensor) -> tuple[Tensor, Tensor]:
        """block_tables [B, W] -> k, v [B, W * page_size, kv_heads, head_dim]."""
        B, W = block_tables.shape
        return tuple(pool[layer][block_tables].reshape(B, W * self.page_size, *pool.shape[3:])
                     for pool in (self.k, self.v))


class KV4Pages:
    """INT4 K and V pages, head-major per page: packed uint8 [layers, pages, kv_heads, page_size, head_dim / 2]
    plus fp16 scale and zero [layers, pages, kv_heads, page_size, groups] (atom_ops.attention's pool layout:
    token slot s = page * page_size + offset of kv head h is [s // page_size, h, s % page_size])."""

    kind = "kv4"

    def __init__(self, layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, group: int):
        self.group = min(group, head_dim)  # as KV4Quantizer does
        if head_dim % self.group or self.group % 2:
            raise ValueError(f"KV4 pages need head_dim ({head_dim}) to be a multiple of an even group "
                             f"({self.group})")
        base = (layers, num_pages, kv_heads, page_size)  # head-major pages (atom_ops.attention's pool layout)
        groups = head_dim // self.group
        self.pools = {}
        for name in ("k", "v"):
            self.pools[name] = (torch.zeros(*base, head_dim // 2, dtype=torch.uint8, device=device),
                                torch.ones(*base, groups, dtype=formats.SCALE_DTYPE, device=device),
                                torch.zeros(*base, groups, dtype=formats.SCALE_DTYPE, device=device))
        self.page_size, self.dtype, self.kv_heads, self.head_dim = page_size, dtype, kv_heads, head_dim
        # the CUDA kernels when they take this shape (atom_ops.attention), else the torch path
        self.fused = (torch.device(device).type == "cuda" and attention_ops.kernels_available()
                      and attention_ops.kernel_limits(head_dim, self.group, dtype) is None)

    @staticmethod
    def bytes_per_page(layers: int, page_size: int, kv_heads: int, head_dim: int, group: int, **_) -> int:
        groups = head_dim // min(group, head_dim)
        per_token_head = head_dim // 2 + 2 * groups * 2  # packed nibbles + fp16 scale and zero
        return 2 * layers * page_size * kv_heads * per_token_head

    def layer_pools(self, layer: int):
        """((packed, scale, zero) of k, same of v) of one layer: the atom_ops.attention pool tuples."""
        return tuple(tuple(t[layer] for t in self.pools[name]) for name in ("k", "v"))

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor, cos: Tensor | None = None,
              sin: Tensor | None = None) -> None:
        """k, v [N, kv_heads, head_dim] (k before RoPE when cos/sin [N, head_dim] are given) into
        flat slots [N]: RoPE, quantize_kv and the write, one kernel when fused."""
        append = attention_ops.kv4_append if self.fused else attention_ops.kv4_append_reference
        append(k, v, slots, *self.layer_pools(layer), cos, sin)

    def read(self, layer: int, block_tables: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, W * page_size, kv_heads, head_dim] in the model's dtype (atom_ops' gather reference)."""
        k, v = attention_ops.kv4_gather_reference(*self.layer_pools(layer), block_tables, self.dtype)
        return k.transpose(1, 2), v.transpose(1, 2)


def kv4_group_of(model) -> int | None:
    """The KV4 group when the model was quantized with an INT4 KV cache (its attention layers
    carry a KV4Quantizer, as quantize_model and load_checkpoint set), else None."""
    from ..quantized_linear import KV4Quantizer

    quantizers = [layer.self_attn.kv_quantizer for layer in model.model.layers]
    if all(isinstance(q, KV4Quantizer) for q in quantizers):
        return quantizers[0].group
    if any(q is not None for q in quantizers):
        raise ValueError("the model's layers mix KV cache formats; the paged cache needs one format")
    return None


def make_pages(model, num_pages: int, page_size: int, dtype: torch.dtype, device) -> FloatPages | KV4Pages:
    """KV4 pages for a model quantized with an INT4 KV cache (atom checkpoints), else float pages."""
    cfg = model.config
    dims = dict(layers=cfg.num_hidden_layers, num_pages=num_pages, page_size=page_size,
                kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=dtype, device=device)
    group = kv4_group_of(model)
    return FloatPages(**dims) if group is None else KV4Pages(**dims, group=group)


def page_bytes(model, page_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    dims = dict(layers=cfg.num_hidden_layers, page_size=page_size, kv_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim, dtype=dtype)
    group = kv4_group_of(model)
    return FloatPages.bytes_per_page(**dims) if group is None else KV4Pages.bytes_per_page(**dims, group=group)
