"""Fused activation quantization: the op that turns a layer's hidden states into the W4A4
GEMM's activation operand, with its pure-torch reference.

    quantize_activation(x, spec, perm=None, clip=1.0, prologue="none", norm_weight=None, eps=1e-5)

prologue (what produces the GEMM input, computed in x's dtype exactly as models/llama.py does):
    "none"      x                                      (attention output before o_proj)
    "rmsnorm"   norm_weight * half(x * rsqrt(mean(x^2) + eps))   (before qkv and gate/up)
    "silu_mul"  silu(x[:, :K]) * x[:, K:]              (the gate_up output before down_proj)
then the channel permutation (outliers last) and Atom's quantization (atom_ops/formats.py).
On a GPU with the extension one CUDA kernel does all of it (quant_ops.cu, one CTA per token, or
several per token for small M);
elsewhere the reference runs. The "none" and "silu_mul" kernels equal the reference bit for bit;
"rmsnorm" sums x^2 in another order than torch, so rstd can differ in the last float bit and a
value on a rounding boundary can move by one quantization step (tests bound how often).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formats
from .formats import FormatError, QuantizedTensor, QuantSpec
from .registration import atom_op

PROLOGUE_NAMES = ("none", "rmsnorm", "silu_mul")


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models/llama.py RMSNorm: normalize in float32, cast back, then scale (in x's dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * h.to(x.dtype)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    k = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :k]) * gate_up[..., k:]


def prologue_reference(x: torch.Tensor, prologue: str, norm_weight=None, eps: float = 1e-5) -> torch.Tensor:
    if prologue == "rmsnorm":
        return rmsnorm_reference(x, norm_weight, eps)
    if prologue == "silu_mul":
        return silu_mul_reference(x)
    return x


def check_quantize_args(x: torch.Tensor, spec: QuantSpec, perm, prologue: str, norm_weight, clip: float) -> None:
    if not 0.0 < clip <= 1.0:
        raise FormatError(f"clip ratio must be in (0, 1], got {clip}")
    if prologue not in PROLOGUE_NAMES:
        raise FormatError(f"prologue must be one of {PROLOGUE_NAMES}, got {prologue!r}")
    if x.dim() != 2:
        raise FormatError(f"quantize_activation expects a 2-D [tokens, channels] tensor, got {tuple(x.shape)}")
    want = 2 * spec.k if prologue == "silu_mul" else spec.k
    if x.shape[1] != want:
        raise FormatError(f"x has {x.shape[1]} channels, expected {want} for {spec} and prologue {prologue!r}")
    if not x.is_floating_point():
        raise FormatError(f"x must be floating point, got {x.dtype}")
    if perm is not None and (perm.dim() != 1 or perm.numel() != spec.k):
        raise FormatError(f"permutation of length {perm.numel()} does not match K={spec.k}")
    if prologue == "rmsnorm":
        if norm_weight is None or norm_weight.shape != (spec.k,):
            raise FormatError(f"rmsnorm needs a [{spec.k}] norm_weight")
        if norm_weight.device != x.device:
            raise FormatError(f"norm_weight on {norm_weight.device} but x on {x.device}")
    if perm is not None and perm.device != x.device:
        raise FormatError(f"perm on {perm.device} but x on {x.device}")


@atom_op("quantize_activation")
def _quantize_activation_op(x: torch.Tensor, perm: torch.Tensor | None, norm_weight: torch.Tensor | None,
                            eps: float, prologue: int, k: int, group: int, outliers: int,
                            clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = QuantSpec(k, group, outliers)
    name = PROLOGUE_NAMES[prologue]
    from . import kernels  # late: the extension loads on first use
    got = kernels.quantize_rows(x, spec, perm, clip, name, norm_weight, eps)
    if got is None:
        got = (formats.quantize_activation(prologue_reference(x, name, norm_weight, eps), spec, perm, clip), None)
    q = got[0]
    return q.packed, q.outlier, q.scale


@torch.library.register_fake("atom::quantize_activation")
def _(x, perm, norm_weight, eps, prologue, k, group, outliers, clip):
    spec = QuantSpec(k, group, outliers)
    m = x.shape[0]
    return (x.new_empty((m, spec.k_normal // 2), dtype=torch.uint8), x.new_empty((m, outliers), dtype=torch.int8),
            x.new_empty((m, spec.scale_columns), dtype=torch.float16))


def quantize_activation(x: torch.Tensor, spec: QuantSpec, perm: torch.Tensor | None = None, clip: float = 1.0,
                        prologue: str = "none", norm_weight: torch.Tensor | None = None,
                        eps: float = 1e-5) -> QuantizedTensor:
    """Prologue + reorder + Atom quantization of token rows (module doc): the packed operand."""
    check_quantize_args(x, spec, perm, prologue, norm_weight, clip)
    packed, outlier, scale = _quantize_activation_op(x, perm, norm_weight, float(eps), PROLOGUE_NAMES.index(prologue),
                                                     spec.k, spec.group, spec.outliers, float(clip))
    return QuantizedTensor(packed, outlier, scale, spec)
