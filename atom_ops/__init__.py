"""Atom W4A4 ops: packed formats, pure-torch references, and torch.library ops over the kernels."""

from .attention import kv4_append, kv4_decode_attention, kv4_gather, kv4_prefill_attention
from .formats import (FormatError, QuantizedTensor, QuantSpec, choose_outliers, dequantize_kv,
                      pack_int4, pack_uint4, quantize_activation, quantize_kv, quantize_operand,
                      unpack_int4, unpack_uint4, w4a4_matmul_reference)
from .linear import quantized_linear
from .ops import w4a4_gemm
from .quant_ops import quantize_activation as quantize_activation_fused

__all__ = [
    "FormatError", "QuantizedTensor", "QuantSpec", "choose_outliers", "dequantize_kv", "kv4_append",
    "kv4_decode_attention", "kv4_gather", "kv4_prefill_attention", "pack_int4",
    "pack_uint4", "quantize_activation", "quantized_linear", "quantize_activation_fused", "quantize_kv", "quantize_operand", "unpack_int4",
    "unpack_uint4", "w4a4_gemm", "w4a4_matmul_reference",
]
