"""GPTQ (Frantar et al. 2022) for Atom's mixed-precision weight format, plus RTN and clip search.

Works in the reordered channel order: normal channels in INT4 groups first, then the INT8
outlier group. A group's scale is taken when GPTQ reaches the group's first column, from the
weights as updated so far (the usual static-groups-free GPTQ), with the clip ratio applied to
INT4 groups only. The result is exactly the packed format of ``atom_ops.formats``.
"""

from __future__ import annotations

import torch

from atom_ops import formats
from atom_ops.formats import QuantizedTensor, QuantSpec


# The column orders GPTQ can walk the reordered layout in (see gptq_quantize).
GPTQ_ORDERS = ("ascending", "descending")


def _groups(spec: QuantSpec):
    """(start, size, bits, clip_applies) for every scale column, outlier group last."""
    for g in range(spec.normal_groups):
        yield g * spec.group, spec.group, 4, True
    if spec.outliers:
        yield spec.k_normal, spec.outliers, 8, False


def pack_weight(q: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """int8 values [N, K] (INT4 range in normal channels) + fp16 scales -> the packed operand."""
    qt = QuantizedTensor(formats.pack_int4(q[:, : spec.k_normal].contiguous()),
                         q[:, spec.k_normal:].contiguous(), scales.contiguous(), spec)
    qt.validate("weight")
    return qt


def rtn_quantize(w: torch.Tensor, spec: QuantSpec, clip: float) -> QuantizedTensor:
    """Round-to-nearest of a reordered [N, K] weight."""
    return formats.quantize_operand(w.float(), spec, clip)


def weighted_error(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the layer's output error on the calibration inputs."""
    d = (w - wq).double()
    return float(((d @ hessian.double()) * d).sum())


def search_clip(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor,
                grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)) -> float:
    """The INT4 clip ratio (one per layer) minimizing the Hessian-weighted RTN error."""
    errors = {c: weighted_error(w, rtn_quantize(w, spec, c).dequantize(), hessian) for c in grid}
    return min(errors, key=errors.get)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, clip: float,
                  block: int = 128, damp: float = 0.01, order: str = "ascending") -> QuantizedTensor:
    """GPTQ on a reordered [N, K] weight with the matching [K, K] Hessian (sum of x x^T).

    ``order`` is the column order GPTQ walks in: "ascending" is the reordered layout as stored
    (outlier group last, Atom's choice); "descending" walks it from the outlier end, so the
    largest-activation channels are quantized first and later columns absorb their error (the
    idea of GPTQ's act-order). Groups are contiguous either way, so the format is unchanged.
    """
    if order not in GPTQ_ORDERS:
        raise ValueError(f"GPTQ order must be one of {GPTQ_ORDERS}, got {order!r}")
    groups = list(_groups(spec))  # (start, size, bits, clip_applies) in storage order
    if order == "descending":
        k = spec.k
        walk = [(k - start - size, size, bits, use_clip) for start, size, bits, use_clip in reversed(groups)]
        cols = torch.arange(k - 1, -1, -1, device=w.device)
        q, scales = _gptq_walk(w[:, cols], hessian[cols][:, cols], walk, clip, block, damp)
        return pack_weight(q[:, cols], scales.flip(1), spec)
    q, scales = _gptq_walk(w, hessian, groups, clip, block, damp)
    return pack_weight(q, scales, spec)


def _gptq_walk(w: torch.Tensor, hessian: torch.Tensor, groups, clip: float, block: int, damp: float):
    """The GPTQ column walk over ``groups`` (start, size, bits, clip_applies) in walk order.
    Returns int8 values [N, K] and one fp16 scale column per group, both in walk order."""
    W = w.detach().clone().float()
    H = hessian.detach().clone().double()
    n, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match K={k}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(k, dtype=H.dtype, device=H.device) * (damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    starts = {s: (i, size, bits, use_clip) for i, (s, size, bits, use_clip) in enumerate(groups)}
    Q = torch.zeros(n, k, dtype=torch.int8, device=W.device)
    scales = torch.zeros(n, len(groups), dtype=formats.SCALE_DTYPE, device=W.device)
    scale = qmax = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col in starts:
                gi, size, bits, use_clip = starts[col]
                qmax = 2 ** (bits - 1) - 1
                # current values of the group: updated ones inside this block, lazily stale ones after it
                group_now = torch.cat([W1[:, i: min(i + size, i2 - i1)], W[:, i2: col + size]], dim=1)
                scale = formats.symmetric_scale(group_now, qmax, clip if use_clip else 1.0)
                scales[:, gi] = scale
            wcol = W1[:, i]
            q = formats.quantize_with_scale(wcol, scale, qmax)
            Q[:, col] = q
            err = (wcol - q.float() * scale.float()) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scales
