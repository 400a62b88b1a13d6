"""Kernel-private staged layouts for the sm90a "fp8digit" W4A4 family, derived from formats.py.

Hopper has no fast INT4 tensor-core instruction (it is emulated), so the sm90a family runs
Atom's arithmetic on FP8 wgmma, whose peak equals INT8's. Every value it multiplies is a small
integer, which e4m3 holds exactly:

    normal groups   INT4 values in [-8, 7]                      (exact in e4m3)
    outlier group   INT8 v = 16 * hi + lo with hi = (v + 8) >> 4 in [-8, 8] and
                    lo = v - 16 * hi in [-8, 7]                  (balanced base-16 digits)
                    dot(a8, w8) = 256 dot(ah, wh) + 16 dot(ah, wl) + 16 dot(al, wh) + dot(al, wl)

so the outlier group becomes four "digit planes" (A digit x B digit), each padded to whole
blocks of 128 columns. Each 128-column block's partial sum is an integer of magnitude
<= 128 * 64 = 2^13, exact in the tensor core's FP8 accumulator; CUTLASS's blockwise-scaling
mainloop (example 67) promotes it into the float32 accumulator after every block with the
block's per-row and per-column scales: acc += (dot * sa) * sw. The digit weights 256/16/16/1
are folded into the weight-side scale (powers of two: exact).

Staged operand (weights once at load time, activations per call):
    values  float8_e4m3fn [rows, K']   K' = 128 * (G + 4 * P),  P = ceil(O / 128)
    scale   float32       [G + 4 * P, rows]   block-major ("MN-major" in CUTLASS terms)

Only group 128 is staged (the mainloop promotes once per 128-column k-tile). Differences from
``w4a4_matmul_reference``: the product order (dot * sa) * sw and the outlier group's four
promotions instead of one; both are float rounding only, the integer dots are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FormatError, QuantizedTensor, QuantSpec, unpack_int4

BLOCK = 128
FP8 = torch.float8_e4m3fn
# (A-side digit, W-side digit, power of two folded into the weight scale), in promotion order.
DIGIT_PLANES = (("hi", "hi", 256.0), ("hi", "lo", 16.0), ("lo", "hi", 16.0), ("lo", "lo", 1.0))


def check_stageable(spec: QuantSpec) -> None:
    if spec.group != BLOCK:
        raise FormatError(f"the sm90a fp8digit kernels need group {BLOCK}, got group={spec.group} "
                          "(group 64 runs on the sm80-family kernels or the reference)")


def outlier_blocks(spec: QuantSpec) -> int:
    """P: 128-column blocks per digit plane."""
    return -(-spec.outliers // BLOCK)


def staged_blocks(spec: QuantSpec) -> int:
    return spec.normal_groups + len(DIGIT_PLANES) * outlier_blocks(spec)


def staged_k(spec: QuantSpec) -> int:
    return BLOCK * staged_blocks(spec)


def int8_digits(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balanced base-16 digits of int8 values: v = 16 * hi + lo, hi in [-8, 8], lo in [-8, 7]."""
    w = v.to(torch.int16)
    hi = (w + 8) >> 4
    return {"hi": hi.to(torch.int8), "lo": (w - 16 * hi).to(torch.int8)}


@dataclass
class StagedOperand:
    values: torch.Tensor   # float8_e4m3fn [rows, K']
    scale: torch.Tensor    # float32 [blocks, rows]
    spec: QuantSpec

    @property
    def rows(self) -> int:
        return self.values.shape[0]


def empty_staged(spec: QuantSpec, rows: int, device) -> StagedOperand:
    """Uninitialized staged buffers of ``rows`` rows, for a kernel to write."""
    check_stageable(spec)
    return StagedOperand(torch.empty((rows, staged_k(spec)), dtype=FP8, device=device),
                         torch.empty((staged_blocks(spec), rows), dtype=torch.float32, device=device), spec)


def stage_operand(t: QuantizedTensor, side: str) -> StagedOperand:
    """Stage an activation (side "a") or weight (side "w") for the fp8digit kernels."""
    if side not in ("a", "w"):
        raise ValueError(f"side must be 'a' or 'w', got {side!r}")
    spec = t.spec
    check_stageable(spec)
    rows, G, P = t.rows, spec.normal_groups, outlier_blocks(spec)
    parts = [unpack_int4(t.packed)]
    scales = [t.scale[:, :G].float().T]
    if spec.outliers:
        digits = int8_digits(t.outlier)
        pad = P * BLOCK - spec.outliers
        s_out = t.scale[:, G].float()
        for a_digit, w_digit, factor in DIGIT_PLANES:
            plane = digits[a_digit if side == "a" else w_digit]
            parts.append(torch.nn.functional.pad(plane, (0, pad)) if pad else plane)
            s = s_out if side == "a" else s_out * factor
            scales.append(s.expand(P, rows))
    values = torch.cat(parts, dim=1).to(torch.float16).to(FP8)
    scale = torch.cat(scales, dim=0).contiguous()
    return StagedOperand(values.contiguous(), scale, spec)


def staged_matmul_reference(a: StagedOperand, w: StagedOperand, out_dtype=torch.float16,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """The fp8digit kernels' arithmetic in torch: per 128-block exact dots, acc += (dot * sa) * sw."""
    if a.spec != w.spec:
        raise FormatError(f"activation spec {a.spec} does not match weight spec {w.spec}")
    va = a.values.float().reshape(a.rows, -1, BLOCK).transpose(0, 1)
    vw = w.values.float().reshape(w.rows, -1, BLOCK).permute(1, 2, 0)
    acc = torch.zeros(a.rows, w.rows, dtype=torch.float32, device=va.device)
    for b in range(va.shape[0]):
        acc += ((va[b] @ vw[b]) * a.scale[b][:, None]) * w.scale[b][None, :]
    if residual is not None:
        acc += residual.float()
    return acc.to(out_dtype)
