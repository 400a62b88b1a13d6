"""Rotary position embedding (RoPE) as one kernel.

    apply_rope(x, cos, sin) -> x * cos + rotate_half(x) * sin
        x [B, H, T, D] (any strides), cos / sin [B, T, D] shared by the heads, all float16 or all
        bfloat16 on a GPU (float32 or CPU tensors: the reference). HF's layout: rotate_half(x) =
        cat(-x[..., D/2:], x[..., :D/2]). Bit-exact with the torch formula (apply_rope_reference):
        each product and the sum rounded to the dtype as torch's elementwise ops round them.

Why a kernel: torch runs the formula as five passes over q (mul, neg, cat, mul, add: ~0.45 ms per
Llama-7B layer of an 8192-token prefill step on the H100, about 9% of the atom mode's step) and
five launches per decode step; the kernel reads x, cos and sin once and writes the result once.
The output is laid out as torch's `x * cos` lays it out for the engine's q view: [B, T, H, D] in
memory, viewed as [B, H, T, D] (always, also from the reference path of the op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import FormatError
from .registration import atom_op

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos / sin [B, T, D]: torch's formula (the arithmetic the kernel reproduces)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def check_rope_args(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise FormatError(f"apply_rope: x must be [B, H, T, D] with an even D, got {tuple(x.shape)}")
    B, _, T, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (B, T, D):
            raise FormatError(f"apply_rope: {name} must be [B, T, D] = {(B, T, D)} for x {tuple(x.shape)}, "
                              f"got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise FormatError(f"apply_rope: {name} must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}")


def runs_kernel(x: Tensor) -> bool:
    """Whether apply_rope(x, ...) runs the CUDA kernel (fp16 / bf16 on a GPU, extension built)."""
    if not x.is_cuda or x.dtype not in _DTYPE_CODE:
        return False
    from .kernels import extension  # late: the extension loads on first use
    ext = extension()
    return ext is not None and hasattr(ext, "apply_rope")


def _strides(t: Tensor) -> list[int]:
    """Element strides, 0 for size-1 dims (their stride is arbitrary; 0 keeps the kernel's 16-byte path)."""
    return [s if n > 1 else 0 for n, s in zip(t.shape, t.stride())]


def _empty_like_torch(x: Tensor) -> Tensor:
    """[B, H, T, D] stored as [B, T, H, D]: the layout torch's elementwise ops give the engine's q
    (a head split of the fused qkv rows), which SDPA and the decode kernels read as they did."""
    B, H, T, D = x.shape
    return torch.empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)


def _launch(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    from .kernels import extension, on_device, raw_stream
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or _strides(cos) != _strides(sin):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = _empty_like_torch(x)
    B, H, T, D = x.shape
    xs, os_, cs = _strides(x), _strides(out), _strides(cos)
    dev = x.device
    with on_device(dev):
        try:
            extension().apply_rope(x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), _DTYPE_CODE[x.dtype],
                                   B, H, T, D, xs[0], xs[1], xs[2], os_[0], os_[1], os_[2], cs[0], cs[1], raw_stream(dev))
        except ValueError as e:
            raise FormatError(str(e)) from None
    return out


@atom_op("apply_rope")
def _apply_rope_op(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    if runs_kernel(x):
        return _launch(x, cos, sin)
    return _empty_like_torch(x).copy_(apply_rope_reference(x, cos, sin))  # the kernel's layout


@torch.library.register_fake("atom::apply_rope")
def _(x, cos, sin):
    return _empty_like_torch(x)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of x [B, H, T, D] with cos / sin [B, T, D] (module doc)."""
    check_rope_args(x, cos, sin)
    return _apply_rope_op(x, cos, sin)
