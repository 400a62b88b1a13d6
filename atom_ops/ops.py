"""torch.library registration of the atom ops: argument checks, fake impls, dispatch.

Each op runs the compiled kernel when the extension is loaded and the tensors are on a GPU
it supports; otherwise it runs the pure-torch reference in ``formats`` (CPU, or a GPU with
no extension). Checks happen before any launch and raise ``FormatError`` naming the problem.
"""

from __future__ import annotations

import torch

from . import formats
from .formats import FormatError, QuantizedTensor, QuantSpec
from .registration import atom_op

_OUT_DTYPES = (torch.float16, torch.bfloat16)


def check_w4a4_args(a: QuantizedTensor, w: QuantizedTensor, out_dtype: torch.dtype,
                    residual: torch.Tensor | None) -> None:
    if a.spec != w.spec:
        raise FormatError(f"activation spec {a.spec} does not match weight spec {w.spec}")
    a.validate("activation")
    check_output_args(a.rows, a.packed.device, w, out_dtype, residual)


def check_output_args(rows: int, device: torch.device, w: QuantizedTensor, out_dtype: torch.dtype,
                      residual: torch.Tensor | None) -> None:
    """The weight, output dtype and residual of a product with `rows` activation rows on `device`."""
    w.validate("weight")
    if device != w.packed.device:
        raise FormatError(f"activation on {device} but weight on {w.packed.device}")
    if out_dtype not in _OUT_DTYPES:
        raise FormatError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if residual is not None:
        if tuple(residual.shape) != (rows, w.rows):
            raise FormatError(f"residual shape {tuple(residual.shape)} != output shape {(rows, w.rows)}")
        if residual.dtype != out_dtype or residual.device != device:
            raise FormatError(f"residual must be {out_dtype} on {device}, "
                              f"got {residual.dtype} on {residual.device}")


@atom_op("w4a4_gemm")
def _w4a4_gemm_op(a_packed: torch.Tensor, a_outlier: torch.Tensor, a_scale: torch.Tensor,
                  w_packed: torch.Tensor, w_outlier: torch.Tensor, w_scale: torch.Tensor,
                  group: int, out_dtype: torch.dtype, residual: torch.Tensor | None) -> torch.Tensor:
    spec = QuantSpec(k=a_packed.shape[1] * 2 + a_outlier.shape[1], group=group, outliers=a_outlier.shape[1])
    a = QuantizedTensor(a_packed, a_outlier, a_scale, spec)
    w = QuantizedTensor(w_packed, w_outlier, w_scale, spec)
    from . import kernels  # late: the extension loads on first use
    out = kernels.w4a4_gemm(a, w, out_dtype, residual)
    if out is None:
        out = formats.w4a4_matmul_reference(a, w, out_dtype, residual)
    return out


@torch.library.register_fake("atom::w4a4_gemm")
def _(a_packed, a_outlier, a_scale, w_packed, w_outlier, w_scale, group, out_dtype, residual):
    return a_packed.new_empty((a_packed.shape[0], w_packed.shape[0]), dtype=out_dtype)


def w4a4_gemm(a: QuantizedTensor, w: QuantizedTensor, out_dtype: torch.dtype = torch.float16,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """y[M, N] = a[M, K] @ w[N, K]^T in Atom's W4A4 arithmetic (see ``formats``).

    On a GPU with compiled kernels (``atom_ops._C``) the generated CUTLASS kernels run, chosen
    by the dispatch table (M buckets); they additionally need N % 16 == 0, group % 64 == 0,
    outliers % 32 == 0 and contiguous operands (``kernels`` module doc), else FormatError.
    Elsewhere (CPU, or no kernel for this GPU) the pure-torch reference runs.
    """
    check_w4a4_args(a, w, out_dtype, residual)
    return _w4a4_gemm_op(a.packed, a.outlier, a.scale, w.packed, w.outlier, w.scale,
                         a.spec.group, out_dtype, residual)
