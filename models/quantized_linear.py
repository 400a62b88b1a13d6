"""Drop-in replacements for nn.Linear that run quantized arithmetic, and the KV4 quantizer.

AtomLinear is the real thing: packed INT4 weights + INT8 outliers, activations quantized per
token on the fly and multiplied in one ``atom_ops.quantized_linear`` call (quantization kernel +
W4A4 GEMM kernel on a GPU, their references otherwise). FakeQuantLinear only simulates other schemes (W8A8, W4A16) for reference rows
of the ablation; it cannot be saved.
"""

from __future__ import annotations

import torch
from torch import nn

import atom_ops
from atom_ops import formats
from atom_ops.formats import QuantizedTensor, QuantSpec


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # The kernels write fp16 or bf16; a bf16 model keeps bf16's range, anything else gets fp16.
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float16


class AtomLinear(nn.Module):
    """y = x @ W^T with W4A4 + INT8 outliers, K reordered by ``perm`` (outliers last)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, act_clip: float,
                 bias: bool = False):
        super().__init__()
        if spec.k != in_features:
            raise ValueError(f"spec K={spec.k} does not match in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.act_clip = spec, act_clip
        n = out_features
        self.register_buffer("weight_packed", torch.zeros(n, spec.k_normal // 2, dtype=torch.uint8))
        self.register_buffer("weight_outlier", torch.zeros(n, spec.outliers, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n, spec.scale_columns, dtype=formats.SCALE_DTYPE))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    @classmethod
    def from_quantized(cls, weight: QuantizedTensor, perm: torch.Tensor | None, act_clip: float,
                       bias: torch.Tensor | None = None) -> "AtomLinear":
        weight.validate("weight")
        mod = cls(weight.spec.k, weight.rows, weight.spec, act_clip, bias=bias is not None)
        mod.weight_packed.copy_(weight.packed)
        mod.weight_outlier.copy_(weight.outlier)
        mod.weight_scale.copy_(weight.scale)
        if perm is not None:
            mod.perm.copy_(perm)
        if bias is not None:
            mod.bias.data.copy_(bias)
        return mod

    @property
    def quantized_weight(self) -> QuantizedTensor:
        return QuantizedTensor(self.weight_packed, self.weight_outlier, self.weight_scale, self.spec)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [N, K] in the original (un-reordered) channel order."""
        w = self.quantized_weight.dequantize()
        return w[:, torch.argsort(self.perm)]

    def forward(self, x: torch.Tensor, prologue: str = "none", norm_weight: torch.Tensor | None = None,
                eps: float = 1e-5, residual: torch.Tensor | None = None, input_permuted: bool = False) -> torch.Tensor:
        """x [..., K] -> [..., N]. `prologue` ("rmsnorm" with norm_weight/eps, or "silu_mul" on a
        [..., 2K] gate_up output) runs inside the quantization kernel; `residual` [..., N], in the
        output dtype, is added in the GEMM's epilogue; `input_permuted`: x's channels already come in
        ``perm``'s order (the producer's output rows were reordered), so none is applied here
        (models/engine/fused_layers.py uses all three)."""
        shape = x.shape
        res = None if residual is None else residual.reshape(-1, self.out_features)
        perm = None if input_permuted else self.perm
        # the fused quantization kernel and the GEMM kernel on a GPU, the formats references elsewhere
        y = atom_ops.quantized_linear(x.reshape(-1, shape[-1]), self.quantized_weight, perm, self.act_clip,
                                      prologue, norm_weight, eps, _out_dtype(x), res).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in={self.in_features}, out={self.out_features}, group={s.group}, "
                f"outliers={s.outliers}, act_clip={self.act_clip}")


class FakeQuantLinear(nn.Module):
    """Simulated quantization for reference rows: dequantized weight, fake-quantized activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, a_bits: int, a_group: int,
                 act_clip: float, perm: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.a_bits, self.a_group, self.act_clip = a_bits, a_group, act_clip
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits < 16:
            x = formats.fake_quantize(x, self.a_bits, self.a_group or x.shape[-1], self.act_clip).to(x.dtype)
        return nn.functional.linear(x, self.weight, self.bias)


class KV4Quantizer(nn.Module):
    """Simulates the INT4 KV cache: asymmetric INT4 per token per head, group along head_dim."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, k: torch.Tensor, v: torch.Tensor):
        g = min(self.group, k.shape[-1])
        return tuple(formats.dequantize_kv(*formats.quantize_kv(t, g), g).to(t.dtype) for t in (k, v))

    def extra_repr(self) -> str:
        return f"group={self.group}"
