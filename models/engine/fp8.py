"""The FP8 baseline mode: W8A8 e4m3 linears through torch._scaled_mm (GPU only).

Weights are quantized once per output channel, activations per token on the fly, both
symmetric with scale = absmax / 448; the product runs on FP8 tensor cores with the row-wise
scales applied in the epilogue. This is the strong baseline a user would pick instead of Atom.
The lm_head stays in the model dtype, as is usual for FP8 serving.
"""

from __future__ import annotations

import torch
from torch import nn

from atom_ops import kernels
from atom_ops.quant_ops import silu_mul_reference

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_fp8_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric e4m3: [M, K] -> (fp8 [M, K], fp32 scales [M, 1]). The scale multiplies by the
    fp32 reciprocal of 448, which is what torch on a GPU does for `/ 448` (a CPU scalar divisor), so
    the CPU and the GPU give the same bits."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).float() * (1.0 / FP8_MAX)).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8_rows(x: torch.Tensor, silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rows_reference in one kernel on a GPU (atom_ops.kernels.fp8_quantize_rows, bit for
    bit), as a serving stack runs its dynamic per-token FP8 quantization: as torch ops it is ~9 small
    kernels per linear, which made this baseline's decode step slower than fp16's. silu_mul: x rows
    are [gate | up] and the rows quantized are silu(gate) * up (the MLP's activation, fused too)."""
    fused = kernels.fp8_quantize_rows(x.detach(), silu_mul=silu_mul)
    if fused is not None:
        return fused
    return quantize_fp8_rows_reference(silu_mul_reference(x) if silu_mul else x)


_ROWWISE_OUT: dict[tuple, bool] = {}


def rowwise_out_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch._scaled_mm with row-wise scales writes `dtype` on this device (older torch
    accepts only bf16 there). Probed once per (dtype, GPU) with a 16 x 16 product, outside any CUDA
    graph capture (the engine runs every layer eagerly before it captures); on the CPU no probe (it
    would be a CUDA call) and bf16 only."""
    if dtype == torch.bfloat16:
        return True
    if device.type != "cuda":
        return False
    key = (dtype, device.index)
    if key not in _ROWWISE_OUT:
        if torch.cuda.is_current_stream_capturing():
            return False  # no probe inside a capture; bf16 + cast is always valid
        a = torch.zeros(16, 16, device=device).to(FP8)
        s = torch.ones(16, 1, device=device)
        try:
            torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t().contiguous(), out_dtype=dtype)
            _ROWWISE_OUT[key] = True
        except (RuntimeError, NotImplementedError, TypeError):  # torch refuses the dtype
            _ROWWISE_OUT[key] = False
    return _ROWWISE_OUT[key]


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        if n % 16 or k % 16:
            raise ValueError(f"FP8 _scaled_mm needs in and out features divisible by 16, got {k} -> {n}")
        w, scale = quantize_fp8_rows(linear.weight)
        self.in_features, self.out_features = k, n
        self.register_buffer("weight_fp8", w.contiguous())          # [N, K] row-major
        self.register_buffer("weight_scale", scale.reshape(1, n))  # fp32, one per output channel
        self.bias = linear.bias

    @classmethod
    def from_quantized(cls, weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> "Fp8Linear":
        """A bias-free Fp8Linear over already quantized e4m3 rows [N, K] and their scales [1, N]."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.out_features, out.in_features = weight_fp8.shape
        out.register_buffer("weight_fp8", weight_fp8)
        out.register_buffer("weight_scale", weight_scale)
        out.bias = None
        return out

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """x [..., K] -> [..., N]; silu_mul: x is [..., 2K] = [gate | up] and the input is silu(gate) * up."""
        shape = x.shape
        xq, x_scale = quantize_fp8_rows(x.reshape(-1, self.in_features * (2 if silu_mul else 1)), silu_mul)
        # b must be column-major: the transpose of the row-major [N, K] weight is exactly that.
        # The model dtype straight from the GEMM where torch's row-wise scaling allows it, else
        # bf16 and a cast (a whole extra pass over the output: 8 of 50 ms per prefill step).
        out_dtype = x.dtype if rowwise_out_ok(x.dtype, x.device) else torch.bfloat16
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             out_dtype=out_dtype).to(x.dtype)  # no copy when it is x's dtype already
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, e4m3 per-channel x per-token"


def convert_to_fp8(model: nn.Module) -> nn.Module:
    """Swap every decoder projection for an Fp8Linear, in place."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"fp8 mode needs a CUDA GPU with FP8 tensor cores (torch._scaled_mm); "
                         f"the model is on {device}. Use mode fp16 or atom on the CPU.")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in _PROJECTIONS:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, Fp8Linear(lin))
    return model
