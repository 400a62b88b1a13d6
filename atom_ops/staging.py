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

Weight fragments (``weight_fragments``, the ``_w4`` kernels): the staged weight's values again,
4 bits per INT4 value, in the order the kernels' register-operand wgmma wants them, so the
decode-size kernels read half the weight bytes (the INT4 groups stay 4-bit in global memory and
become e4m3 in registers). Rows in blocks of 64 (one consumer warp group's wgmma M): per block
the G INT4 k-tiles (4096 bytes each), then the P outlier k-tiles (8192 bytes each, int8):
    INT4 k-tile   thread t of the warp group (warp w = t // 32, g = lane // 4, c = lane % 4)
                  holds 64 nibbles n (16 fragment registers q = n // 4 of 4 values, byte
                  b = n % 4); register q = 4 kb + r is wgmma k-block kb's register r:
                  row 16 w + g + 8 (r % 2), column 32 kb + 16 (r // 2) + 4 c + b (the PTX A
                  fragment of m64nNk32 for 8-bit types, CuTe's ALayout_64x32). Nibble n is at
                  byte 2048 (n // 32) + 16 t + (n % 32) // 2, low nibble first: each warp reads
                  two 512-byte runs with 16-byte loads (k-blocks 0-1, then 2-3).
    outlier       the same registers as int8 bytes: register r of k-block kb at byte
                  2048 kb + 16 t + 4 r + b.
"""

from __future__ import annotations

import functools
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
    frag4: torch.Tensor | None = None  # weights: weight_fragments(), made on first use

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


FRAG_ROWS = 64             # rows per fragment block (one warp group's wgmma M)
FRAG_INT4_BYTES = 4096     # one INT4 k-tile of a block: 64 x 128 nibbles
FRAG_OUTLIER_BYTES = 8192  # one outlier k-tile of a block: 64 x 128 int8


@functools.cache
def _fragment_coords(values_per_byte: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) inside a 64 x 128 k-tile of each value slot of the fragment layout (module
    docstring), slots in memory order (nibble slot = 2 * byte + high nibble); 2 values per byte
    for the INT4 k-tiles, 1 for the outlier ones. Made once per device."""
    slot = torch.arange(FRAG_ROWS * BLOCK)
    byte = slot // values_per_byte
    t = (byte % 2048) // 16
    if values_per_byte == 2:   # INT4: thread nibble n from byte 2048 h + 16 t + o, nibble slot % 2
        n = (byte // 2048) * 32 + (byte % 16) * 2 + slot % 2
        q, b = n // 4, n % 4
        kb, r = q // 4, q % 4
    else:                      # outlier int8: byte 2048 kb + 16 t + 4 r + b
        kb, r, b = byte // 2048, (byte % 16) // 4, byte % 4
    w, lane = t // 32, t % 32
    g, c = lane // 4, lane % 4
    return (16 * w + g + 8 * (r % 2)).to(device), (32 * kb + 16 * (r // 2) + 4 * c + b).to(device)


def max_split_k(spec: QuantSpec) -> int:
    """Largest split-K factor of the wgmma split-K kernels (_w4_sk): every split keeps >= 2
    staged k-tiles, so its first one is an INT4 k-tile whose record the mainloop reads."""
    return staged_blocks(spec) // 2


def fragments_supported(spec: QuantSpec, rows: int) -> bool:
    return spec.group == BLOCK and rows % FRAG_ROWS == 0


def weight_fragments(st: StagedOperand) -> torch.Tensor:
    """uint8 [rows / 64, G * 4096 + P * 8192]: the staged weight in the ``_w4`` kernels'
    register-fragment order (module docstring); made once and kept in ``st.frag4``."""
    if st.frag4 is not None:
        return st.frag4
    spec, rows = st.spec, st.rows
    if not fragments_supported(spec, rows):
        raise FormatError(f"weight fragments need group {BLOCK} and rows % {FRAG_ROWS} == 0, got "
                          f"group={spec.group} rows={rows}")
    G, P, dev = spec.normal_groups, outlier_blocks(spec), st.values.device
    blocks = rows // FRAG_ROWS
    tiles = st.values.view(blocks, FRAG_ROWS, G + P, BLOCK).permute(0, 2, 1, 3)  # [blocks, k-tile, 64, 128]
    row, col = _fragment_coords(2, dev)
    ints = tiles[:, :G].contiguous().view(FP8).to(torch.int16)[:, :, row, col]  # [blocks, G, 8192] nibble slots
    nib = (ints & 0xF).to(torch.uint8)
    parts = [(nib[..., 0::2] | (nib[..., 1::2] << 4)).reshape(blocks, G * FRAG_INT4_BYTES)]
    if P:
        row, col = _fragment_coords(1, dev)
        parts.append(tiles[:, G:][:, :, row, col].reshape(blocks, P * FRAG_OUTLIER_BYTES))
    st.frag4 = torch.cat(parts, dim=1).contiguous()
    return st.frag4


def fragments_to_values(frag4: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The staged values [rows, K'] that ``weight_fragments`` reordered (its inverse; tests)."""
    G, P = spec.normal_groups, outlier_blocks(spec)
    blocks, dev = frag4.shape[0], frag4.device
    tiles = torch.empty((blocks, G + P, FRAG_ROWS, BLOCK), dtype=torch.uint8, device=dev)
    row, col = _fragment_coords(2, dev)
    packed = frag4[:, : G * FRAG_INT4_BYTES].view(blocks, G, FRAG_INT4_BYTES)
    nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(blocks, G, -1).to(torch.int16)
    vals = torch.where(nib >= 8, nib - 16, nib).to(torch.float16).to(FP8).view(torch.uint8)
    tiles[:, :G, row, col] = vals
    if P:
        row, col = _fragment_coords(1, dev)
        tiles[:, G:, row, col] = frag4[:, G * FRAG_INT4_BYTES :].view(blocks, P, FRAG_OUTLIER_BYTES)
    return tiles.permute(0, 2, 1, 3).reshape(blocks * FRAG_ROWS, (G + P) * BLOCK).contiguous()


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
