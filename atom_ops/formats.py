"""The packed formats every op, kernel, checkpoint and test agrees on. One module, one truth.

Operand layout (weights [N, K] and activations [M, K] alike, K already reordered so the
outlier channels are the last ``O`` columns):

    normal channels  K_n = K - O, split into G = K_n / group groups along K
    packed   uint8   [rows, K_n / 2]   signed INT4, two per byte
    outlier  int8    [rows, O]         INT8 outlier channels (absent when O == 0)
    scale    float16 [rows, G + (O > 0)]  one symmetric scale per group; the outlier
                                          group's scale is the last column

INT4 nibble order: element 2i sits in the low nibble of byte i, element 2i+1 in the high
nibble, both two's complement. This is the order of ``cutlass::int4b_t`` arrays, so a kernel
can hand the bytes straight to CUTLASS. The INT4 KV cache uses the same order with unsigned
nibbles (0..15).

Symmetric quantization of a group x with clip ratio c and q_max = 2^(bits-1) - 1:
    scale = fp16(c * max|x| / q_max)   (0 -> 1, so all-zero groups stay 0)
    q     = clamp(round_half_even(x / float(scale)), -q_max - 1, q_max)
Every kernel reproduces this bit for bit (division, not multiplication by a reciprocal).

Asymmetric INT4 KV quantization of a group x (per token, per head, along head_dim):
    scale = fp16((max x - min x) / 15) (0 -> 1), zero = fp16(min x)
    q     = clamp(round_half_even((x - float(zero)) / float(scale)), 0, 15)
    x'    = q * scale + zero

The W4A4 product (Atom's formula), for output element (m, n):
    y[m, n] = sum over groups g, in order, outlier group last, of
              float(dot_int(qa[m, g], qw[n, g])) * (float(sa[m, g]) * float(sw[n, g]))
accumulated in float32, plus an optional residual, then rounded to the output dtype.
Rounding, exactly: per group, s = fp32(sa * sw) and acc = fma(dot, s, acc) (one rounding per
group: a GPU's FFMA); the integer dot is exact. The wgmma kernels and the mma family's multistage
tiles without split-K compute exactly this, in this order (tests/test_gemm_gpu.py::must_be_exact);
split-K and the stream kernels' K split across warps sum the same terms in another order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rules import FormatError, choose_outliers  # noqa: F401  (re-exported)

INT4_MAX = 7
INT8_MAX = 127
UINT4_MAX = 15
SCALE_DTYPE = torch.float16
# Outlier dots must stay exact in the float32 reference: O * 127 * 128 < 2^24.
MAX_OUTLIERS = 1024


@dataclass(frozen=True)
class QuantSpec:
    """How the K dimension of one linear layer is split: normal INT4 groups + INT8 outliers."""

    k: int
    group: int
    outliers: int

    def __post_init__(self):
        if self.k <= 0 or self.group <= 0 or self.outliers < 0:
            raise FormatError(f"invalid QuantSpec {self}: k, group must be > 0, outliers >= 0")
        if self.outliers > MAX_OUTLIERS:
            raise FormatError(f"outliers={self.outliers} exceeds the supported maximum {MAX_OUTLIERS}")
        if self.outliers % 2 or self.group % 2:
            raise FormatError(f"group ({self.group}) and outliers ({self.outliers}) must be even")
        kn = self.k - self.outliers
        if kn <= 0 or kn % self.group:
            raise FormatError(
                f"K={self.k} must equal outliers ({self.outliers}) + a positive multiple of "
                f"the group size ({self.group}); K - outliers = {kn}")

    @property
    def k_normal(self) -> int:
        return self.k - self.outliers

    @property
    def normal_groups(self) -> int:
        return self.k_normal // self.group

    @property
    def scale_columns(self) -> int:
        return self.normal_groups + (1 if self.outliers else 0)


# ----------------------------------------------------------------------------- packing

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed INT4 values (int8 in [-8, 7]) -> uint8, two per byte along the last dim."""
    if q.dtype != torch.int8:
        raise FormatError(f"pack_int4 expects int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise FormatError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 with two signed nibbles -> int8 values in [-8, 7], twice as long."""
    if p.dtype != torch.uint8:
        raise FormatError(f"unpack_int4 expects uint8, got {p.dtype}")
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both)


def pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """Unsigned INT4 values (uint8 in [0, 15]) -> uint8, same nibble order as pack_int4."""
    if q.dtype != torch.uint8:
        raise FormatError(f"pack_uint4 expects uint8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise FormatError(f"pack_uint4 needs an even last dimension, got {tuple(q.shape)}")
    return (q[..., 0::2] & 0xF) | (q[..., 1::2] << 4)


def unpack_uint4(p: torch.Tensor) -> torch.Tensor:
    if p.dtype != torch.uint8:
        raise FormatError(f"unpack_uint4 expects uint8, got {p.dtype}")
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


# ------------------------------------------------------------------------ quantizers

def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    if x.shape[-1] % group:
        raise FormatError(f"last dimension {x.shape[-1]} is not a multiple of group {group}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def true_div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor by IEEE division on every device. (torch's CUDA kernel for a tensor divided by
    a Python scalar multiplies by the reciprocal instead, which rounds differently in rare cases;
    the format, and every kernel, divides.)"""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def symmetric_scale(x: torch.Tensor, qmax: int, clip: float = 1.0) -> torch.Tensor:
    """fp16 scale of each row of ``x`` (reduced over the last dim), as the format defines."""
    if not 0.0 < clip <= 1.0:
        raise FormatError(f"clip ratio must be in (0, 1], got {clip}")
    absmax = x.detach().abs().amax(dim=-1).float()
    scale = true_div(absmax * clip, qmax).clamp(max=torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(x / scale) clamped to [-qmax-1, qmax]; ``scale`` broadcasts against ``x``."""
    q = torch.round(x.float() / scale.float())
    return q.clamp(-qmax - 1, qmax).to(torch.int8)


def quantize_symmetric(x: torch.Tensor, bits: int, group: int, clip: float = 1.0):
    """Group-wise symmetric quantization along the last dim -> (int8 values, fp16 scales [.., G])."""
    qmax = 2 ** (bits - 1) - 1
    xg = _grouped(x.float(), group)
    scale = symmetric_scale(xg, qmax, clip)
    q = quantize_with_scale(xg, scale[..., None], qmax)
    return q.reshape(x.shape), scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    qg = _grouped(q.float(), group)
    return (qg * scale.float()[..., None]).reshape(q.shape)


def fake_quantize(x: torch.Tensor, bits: int, group: int, clip: float = 1.0) -> torch.Tensor:
    """Quantize then dequantize (float32 out): what the model sees of a quantized tensor."""
    q, s = quantize_symmetric(x, bits, group, clip)
    return dequantize_symmetric(q, s, group)


@dataclass
class QuantizedTensor:
    """One operand in the packed format above (a weight [N, K] or an activation [M, K])."""

    packed: torch.Tensor          # uint8 [rows, K_n / 2]
    outlier: torch.Tensor         # int8  [rows, O]
    scale: torch.Tensor           # fp16  [rows, G + (O > 0)]
    spec: QuantSpec

    @property
    def rows(self) -> int:
        return self.packed.shape[0]

    def validate(self, name: str = "operand") -> None:
        s = self.spec
        want = {
            "packed": ((self.rows, s.k_normal // 2), torch.uint8),
            "outlier": ((self.rows, s.outliers), torch.int8),
            "scale": ((self.rows, s.scale_columns), SCALE_DTYPE),
        }
        for field, (shape, dtype) in want.items():
            t = getattr(self, field)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise FormatError(f"{name}.{field}: expected {dtype} {shape} for {s}, "
                                  f"got {t.dtype} {tuple(t.shape)}")
        devices = {t.device for t in (self.packed, self.outlier, self.scale)}
        if len(devices) != 1:
            raise FormatError(f"{name}: tensors on different devices {sorted(map(str, devices))}")

    def int_values(self) -> torch.Tensor:
        """int8 [rows, K]: INT4 normal values then INT8 outliers (the reordered K order)."""
        return torch.cat([unpack_int4(self.packed), self.outlier], dim=-1)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, K] in the reordered K order."""
        s = self.spec
        normal = dequantize_symmetric(unpack_int4(self.packed), self.scale[:, : s.normal_groups], s.group)
        if not s.outliers:
            return normal
        return torch.cat([normal, self.outlier.float() * self.scale[:, -1:].float()], dim=-1)

    def to(self, device) -> "QuantizedTensor":
        return QuantizedTensor(self.packed.to(device), self.outlier.to(device), self.scale.to(device), self.spec)


def quantize_operand(x: torch.Tensor, spec: QuantSpec, clip: float = 1.0) -> QuantizedTensor:
    """Quantize rows of an already reordered [rows, K] tensor: INT4 groups (clipped) + INT8 outliers.

    The clip ratio applies to the INT4 groups only; the INT8 outlier group is never clipped.
    """
    if x.dim() != 2 or x.shape[-1] != spec.k:
        raise FormatError(f"expected a [rows, {spec.k}] tensor, got {tuple(x.shape)}")
    q, s = quantize_symmetric(x[:, : spec.k_normal], 4, spec.group, clip)
    packed = pack_int4(q)
    if spec.outliers:
        qo, so = quantize_symmetric(x[:, spec.k_normal:], 8, spec.outliers, 1.0)
        scale = torch.cat([s, so], dim=-1)
    else:
        qo = torch.empty(x.shape[0], 0, dtype=torch.int8, device=x.device)
        scale = s
    return QuantizedTensor(packed, qo, scale, spec)


def reorder(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Apply a channel permutation along the last dim (outliers last); None = identity."""
    if perm is None:
        return x
    if perm.dim() != 1 or perm.numel() != x.shape[-1]:
        raise FormatError(f"permutation of length {perm.numel()} does not match K={x.shape[-1]}")
    return x.index_select(-1, perm.to(x.device))


def quantize_activation(x: torch.Tensor, spec: QuantSpec, perm: torch.Tensor | None = None,
                        clip: float = 1.0) -> QuantizedTensor:
    """Per-token activation quantization: reorder channels, then quantize_operand."""
    x2 = x.reshape(-1, x.shape[-1])
    return quantize_operand(reorder(x2, perm), spec, clip)


# -------------------------------------------------------------------------- KV cache

def quantize_kv(x: torch.Tensor, group: int):
    """Asymmetric INT4 along the last dim (head_dim) -> (packed uint8, scale fp16, zero fp16)."""
    xg = _grouped(x.float(), group)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    scale = true_div(hi - lo, UINT4_MAX).to(SCALE_DTYPE)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = lo.to(SCALE_DTYPE)
    q = torch.round((xg - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, UINT4_MAX)
    return pack_uint4(q.to(torch.uint8).reshape(x.shape)), scale, zero


def dequantize_kv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    q = _grouped(unpack_uint4(packed).float(), group)
    return (q * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)


# --------------------------------------------------------------------- W4A4 product

_LOW29 = (1 << 29) - 1   # float64 mantissa bits below float32's
_HALF29 = 1 << 28        # ... holding exactly half a float32 ulp: a float32 tie


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fma(a, b, c) for float32 tensors, rounded once (round-to-nearest-even), as CUDA's FFMA.

    torch.addcmul computes exactly this on the devices we know (vectorized fused multiply-add:
    0 mismatches over 10M values on an AVX512 CPU and 16M on the H100, where a plain multiply and
    add differs on ~1/4 of them), so it is used wherever a probe
    against the exact emulation (``fma_f32_exact``) on the same kind of call passed: same-shape
    contiguous float32 operands, checked once per device type. Elsewhere the exact emulation runs
    (~4x slower on the CPU).
    """
    same = a.shape == b.shape == c.shape and all(t.is_contiguous() and t.dtype == torch.float32 for t in (a, b, c))
    if same and _addcmul_is_fma(c.device):
        return torch.addcmul(c, a, b)
    return fma_f32_exact(a, b, c)


def fma_f32_exact(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fma(a, b, c), rounded once, emulated exactly in float64.

    a * b is exact in float64 (24 + 24 bits), so the float64 sum s is off the exact value by less
    than half a float64 ulp, and rounding s to float32 is correct unless s is itself a float32 tie
    (double rounding). Those rare elements are redone with the float64 sum's exact error
    (TwoSum) and rounding to odd, which makes the final rounding exact. (Normal float32 results;
    subnormal ones can double-round.)
    """
    s = torch.addcmul(c.double(), a.double(), b.double())
    tie = (s.view(torch.int64) & _LOW29) == _HALF29
    if bool(tie.any()):
        a, b, c = (t.expand(s.shape)[tie].double() for t in (a, b, c))
        p = a * b
        t = p + c
        v = t - p
        err = (p - (t - v)) + (c - v)
        odd = (t.view(torch.int64) & 1) == 1
        toward = torch.where(err > 0, torch.full_like(t, float("inf")), torch.full_like(t, float("-inf")))
        s[tie] = torch.where((err == 0) | odd, t, torch.nextafter(t, toward))
    return s.float()


_ADDCMUL_IS_FMA: dict[str, bool] = {}


def _addcmul_is_fma(device: torch.device) -> bool:
    """Whether torch.addcmul rounds once on this device type, probed on odd-sized operands (vector
    body and scalar tail) that include a double-rounding case and ~1/4 of cases where a separate
    multiply and add would differ."""
    key = device.type
    if key not in _ADDCMUL_IS_FMA:
        g = torch.Generator().manual_seed(0)
        dot = torch.randint(-2**13, 2**13 + 1, (37, 131), generator=g).float()
        scale = torch.rand(37, 131, generator=g) * 1e-3
        acc = torch.randn(37, 131, generator=g) * 4
        dot[0, 0], scale[0, 0], acc[0, 0] = 1 + 2**-23, (1 - 2**-23) * 2**-24, 1 + 2**-23  # double rounding
        a, b, c = (t.to(device) for t in (dot, scale, acc))
        _ADDCMUL_IS_FMA[key] = bool(torch.equal(torch.addcmul(c, a, b), fma_f32_exact(a, b, c)))
    return _ADDCMUL_IS_FMA[key]


def w4a4_matmul_reference(a: QuantizedTensor, w: QuantizedTensor, out_dtype=torch.float16,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """Atom's W4A4 GEMM, y = a @ w^T, with exactly the kernels' arithmetic (see module doc).

    Integer dots are computed in float32, where they are exact (|INT4 dot| <= 128 * 64 per
    group of 128, |INT8 dot| < 2^24 for O <= 1024); scales multiply in float32; groups are
    summed in order with the outlier group last, each as acc = fma(dot, sa * sw, acc).
    """
    if a.spec != w.spec:
        raise FormatError(f"activation spec {a.spec} does not match weight spec {w.spec}")
    spec = a.spec
    G = spec.normal_groups
    # group-major copies ([G, M, g] and [G, g, N]) so each group's dot is one dense matmul
    qa = unpack_int4(a.packed).float().reshape(a.rows, G, spec.group).transpose(0, 1).contiguous()
    qw = unpack_int4(w.packed).float().reshape(w.rows, G, spec.group).permute(1, 2, 0).contiguous()
    sa = a.scale.float()
    sw = w.scale.float()
    acc = torch.zeros(a.rows, w.rows, dtype=torch.float32, device=qa.device)
    for g in range(G):
        acc = fma_f32(qa[g] @ qw[g], sa[:, g : g + 1] * sw[None, :, g], acc)
    if spec.outliers:
        dot = a.outlier.float() @ w.outlier.float().T
        acc = fma_f32(dot, sa[:, -1:] * sw[None, :, -1], acc)
    if residual is not None:
        acc += residual.float()
    return acc.to(out_dtype)
