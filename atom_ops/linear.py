"""atom::quantized_linear: a quantized layer's whole input-to-output path in one op.

    y = quantized_linear(x, w, perm=None, clip=1.0, prologue="none", norm_weight=None, eps=1e-5,
                         out_dtype=torch.float16, residual=None)

is ``w4a4_gemm(quantize_activation(x, w.spec, perm, clip, prologue, norm_weight, eps), w, out_dtype,
residual)``: the prologue (none / RMSNorm / SiLU(gate) * up, quant_ops), Atom's activation
quantization, the W4A4 GEMM, and the residual added in float32 before the output rounding. On a GPU
with the extension it is two launches, the fused quantization kernel and the GEMM kernel (for the
sm90a wgmma family the quantization kernel writes the staged operand the GEMM reads, so no staging
launch between them); elsewhere the same composition of references.
"""

from __future__ import annotations

import torch

from . import formats
from .formats import QuantizedTensor, QuantSpec
from .ops import check_output_args
from .quant_ops import PROLOGUE_NAMES, check_quantize_args, prologue_reference
from .registration import atom_op


@atom_op("quantized_linear")
def _quantized_linear_op(x: torch.Tensor, perm: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                         prologue: int, clip: float, w_packed: torch.Tensor, w_outlier: torch.Tensor,
                         w_scale: torch.Tensor, group: int, out_dtype: torch.dtype,
                         residual: torch.Tensor | None) -> torch.Tensor:
    spec = QuantSpec(k=w_packed.shape[1] * 2 + w_outlier.shape[1], group=group, outliers=w_outlier.shape[1])
    w = QuantizedTensor(w_packed, w_outlier, w_scale, spec)
    name = PROLOGUE_NAMES[prologue]
    from . import kernels  # late: the extension loads on first use
    out = kernels.quantized_linear(x, w, perm, clip, name, norm_weight, eps, out_dtype, residual)
    if out is None:
        a = formats.quantize_activation(prologue_reference(x, name, norm_weight, eps), spec, perm, clip)
        out = formats.w4a4_matmul_reference(a, w, out_dtype, residual)
    return out


@torch.library.register_fake("atom::quantized_linear")
def _(x, perm, norm_weight, eps, prologue, clip, w_packed, w_outlier, w_scale, group, out_dtype, residual):
    return x.new_empty((x.shape[0], w_packed.shape[0]), dtype=out_dtype)


def quantized_linear(x: torch.Tensor, w: QuantizedTensor, perm: torch.Tensor | None = None, clip: float = 1.0,
                     prologue: str = "none", norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                     out_dtype: torch.dtype = torch.float16, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (or [M, 2K] for silu_mul) -> y [M, N] in out_dtype (module doc)."""
    check_quantize_args(x, w.spec, perm, prologue, norm_weight, clip)
    check_output_args(x.shape[0], x.device, w, out_dtype, residual)
    return _quantized_linear_op(x, perm, norm_weight, float(eps), PROLOGUE_NAMES.index(prologue), float(clip),
                                w.packed, w.outlier, w.scale, w.spec.group, out_dtype, residual)
