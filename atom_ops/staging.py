"""Kernel-private staged layout of the sm90a wgmma W4A4 family, derived from formats.py.

Hopper has no fast INT4 tensor-core instruction (it is emulated), so the sm90a family runs the
INT4 groups on FP8 wgmma (whose peak equals INT8's) and the INT8 outlier group on s8 wgmma:

    normal groups   INT4 values in [-8, 7] as float8 e4m3 bytes (exact small integers); each
                    128-column block's dot (|dot| <= 128 * 64 = 2^13) is exact in the FP8
                    tensor core's accumulator
    outlier group   the INT8 values as raw two's complement bytes, zero padded to P =
                    ceil(O / 128) blocks of 128; s8 x s8 -> s32 wgmma, exact

The kernel's mainloop (templates/atom_wgmma_overlap.cuh.j2) promotes each group's exact dot into
the float32 accumulator with the group's per-row and per-column scales, acc = fma(dot, sa * sw,
acc), in K order with the outlier group last: exactly ``formats.w4a4_matmul_reference``. The
kernels take one outlier block (O <= 128); the format itself allows more.

Staged operand (weights once at load time, activations per call; both sides the same format):
    values  uint8   [rows, K']   K' = 128 * (G + P): G blocks of e4m3 bytes, P of int8 bytes
    scale   float32 [G + P, rows]   block-major ("MN-major" in CUTLASS terms); every outlier
                                    block carries the outlier group's scale

Only group 128 is staged (one promotion per 128-column k-tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FormatError, QuantizedTensor, QuantSpec, pack_int4, unpack_int4, w4a4_matmul_reference

BLOCK = 128
FP8 = torch.float8_e4m3fn


def check_stageable(spec: QuantSpec) -> None:
    if spec.group != BLOCK:
        raise FormatError(f"the sm90a wgmma kernels need group {BLOCK}, got group={spec.group} "
                          "(group 64 runs on the sm80-family kernels or the reference)")


def outlier_blocks(spec: QuantSpec) -> int:
    """P: 128-column blocks of the outlier group."""
    return -(-spec.outliers // BLOCK)


def staged_blocks(spec: QuantSpec) -> int:
    return spec.normal_groups + outlier_blocks(spec)


def staged_k(spec: QuantSpec) -> int:
    return BLOCK * staged_blocks(spec)


@dataclass
class StagedOperand:
    values: torch.Tensor   # uint8 [rows, K']: e4m3 bytes, then int8 bytes
    scale: torch.Tensor    # float32 [blocks, rows]
    spec: QuantSpec

    @property
    def rows(self) -> int:
        return self.values.shape[0]


def empty_staged(spec: QuantSpec, rows: int, device) -> StagedOperand:
    """Uninitialized staged buffers of ``rows`` rows, for a kernel to write."""
    check_stageable(spec)
    return StagedOperand(torch.empty((rows, staged_k(spec)), dtype=torch.uint8, device=device),
                         torch.empty((staged_blocks(spec), rows), dtype=torch.float32, device=device), spec)


def stage_operand(t: QuantizedTensor) -> StagedOperand:
    """Stage an activation or a weight (the same format on both sides) for the wgmma kernels."""
    spec = t.spec
    check_stageable(spec)
    rows, G, P = t.rows, spec.normal_groups, outlier_blocks(spec)
    parts = [unpack_int4(t.packed).to(torch.float16).to(FP8).view(torch.uint8)]
    scales = [t.scale[:, :G].float().T]
    if spec.outliers:
        parts.append(torch.nn.functional.pad(t.outlier, (0, P * BLOCK - spec.outliers)).view(torch.uint8))
        scales.append(t.scale[:, G].float().expand(P, rows))
    return StagedOperand(torch.cat(parts, dim=1).contiguous(), torch.cat(scales, dim=0).contiguous(), spec)


def unstage(st: StagedOperand) -> QuantizedTensor:
    """The packed operand a staged one holds (the inverse of stage_operand)."""
    spec, G = st.spec, st.spec.normal_groups
    normal = st.values[:, : G * BLOCK].view(FP8).float()
    outlier = st.values[:, G * BLOCK : G * BLOCK + spec.outliers].view(torch.int8).contiguous()
    scale = st.scale[: G + (spec.outliers > 0)].T.to(torch.float16).contiguous()
    return QuantizedTensor(pack_int4(normal.to(torch.int8)), outlier, scale, spec)


def staged_matmul_reference(a: StagedOperand, w: StagedOperand, out_dtype=torch.float16,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """The wgmma kernels' product of staged operands: w4a4_matmul_reference of what they hold."""
    if a.spec != w.spec:
        raise FormatError(f"activation spec {a.spec} does not match weight spec {w.spec}")
    return w4a4_matmul_reference(unstage(a), unstage(w), out_dtype, residual)
