"""The decoder layers regrouped for serving: one GEMM per projection group (q|k|v, gate|up).

fp16 / fp8 models (MergedProjectionLayer): the group's weights stacked into one linear, as serving
stacks do (vLLM's QKVParallelLinear, MergedColumnParallelLinear); the originals become views of the
stacked weights (nothing held twice). The rest of the layer is llama.DecoderLayer's ops, with on a
GPU the fused RMSNorm and SiLU-and-multiply (fp8: fused with the activation quantization) a serving
stack runs (rms_norm, silu_mul_down).

Atom models (FusedAtomLayer): one kernel pair per projection group.

A checkpoint's layer has seven AtomLinears and two RMSNorms in torch (models/llama.py), so every
token pays the torch RMSNorm, three quantizations of the same normalized input (q, k, v), two of
the next one (gate, up), a torch SiLU-mul and two torch residual adds. The quantization recipe gives
q/k/v and gate/up one shared channel permutation, spec and clip (models/quantize.py), so here:

    qkv      = AtomLinear(q|k|v rows)    prologue RMSNorm(input_layernorm)      one quantization
    x       += o_proj(attention)         residual added in the GEMM epilogue
    gate_up  = AtomLinear(gate|up rows)  prologue RMSNorm(post_attention_layernorm)
    x       += down_proj(gate_up)        prologue SiLU(gate) * up, residual in the epilogue

gate_up's rows are stored in down_proj's channel order (the reorder Atom folds into the producer),
so the SiLU quantization reads its input unpermuted: the kernel then stages only the columns each
CTA quantizes instead of gathering from the whole row (SiLU + quantize at Llama-3-8B, M = 16 on the
H100: 0.73 -> 0.85 of copy bandwidth). Bit-identical: the GEMM's outputs are only relocated.

Same arithmetic as the layer it replaces except for float rounding: the kernels' RMSNorm sums x^2
in another order, and a residual is added to the float accumulator before the output rounding
instead of after it. Only for fp16/bf16 models (the residual stream must be the GEMM's output
dtype). The concatenated weights are copies and the model is not modified: the q/k/v and gate/up
4-bit weights are held twice (about 0.7x the packed weight bytes more; only the copies are ever
staged for the sm90a kernels), on top of the engine's KV budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atom_ops import kernels

from ..llama import apply_rope
from ..quantized_linear import AtomLinear


def _bias_free_atom(m: nn.Module) -> bool:
    return isinstance(m, AtomLinear) and m.bias is None


def _share_quantization(lins: list[nn.Module]) -> bool:
    """Bias-free AtomLinears with one spec, permutation and clip: one quantization serves them all."""
    first = lins[0]
    return all(_bias_free_atom(m) and m.spec == first.spec and m.act_clip == first.act_clip
               and torch.equal(m.perm, first.perm) for m in lins)


def concat_linears(lins: list[AtomLinear], row_order: Tensor | None = None) -> AtomLinear:
    """One AtomLinear computing all `lins` (rows stacked in order; _share_quantization(lins) holds);
    with `row_order`, each one's output row j is its row row_order[j]."""
    first = lins[0]
    out = AtomLinear(first.in_features, sum(m.out_features for m in lins), first.spec, first.act_clip)
    order = None if row_order is None else row_order.to(first.weight_packed.device)
    rows = (lambda t: t) if order is None else (lambda t: t[order])
    out.weight_packed = torch.cat([rows(m.weight_packed) for m in lins])
    out.weight_outlier = torch.cat([rows(m.weight_outlier) for m in lins])
    out.weight_scale = torch.cat([rows(m.weight_scale) for m in lins])
    out.perm = first.perm
    return out


def attend_qkv(attn, qkv: Tensor, split: tuple[int, int, int], B: int, T: int, cos: Tensor, sin: Tensor,
               kv_cache=None) -> Tensor:
    """llama.Attention.forward from the projected q|k|v rows [B * T, (Hq + 2 Hkv) D] up to o_proj's
    input [B, T, Hq * D]: RoPE, then the paged cache's attend (or, without one, attention over T)."""
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in qkv.split(split, dim=-1))
    q = apply_rope(q, cos, sin)
    if kv_cache is not None:
        out = kv_cache.attend(q, k, v, cos, sin)
    else:  # plain forward (no cache), as llama.Attention does it
        k = apply_rope(k, cos, sin)
        if attn.kv_quantizer is not None:
            k, v = attn.kv_quantizer(k, v)
        out = attn._attend(q, k, v)
    return out.transpose(1, 2).reshape(B, T, -1)


def projection_groups(layers) -> list[tuple[list[nn.Module], list[nn.Module]]]:
    """Each decoder layer's ([q, k, v], [gate, up]) projections: the groups the regrouped layers merge."""
    return [([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
             [layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in layers]


class FusedAtomLayer(nn.Module):
    def __init__(self, layer, qkv: AtomLinear, gate_up: AtomLinear):
        super().__init__()
        attn = layer.self_attn
        self.attn, self.qkv, self.gate_up = attn, qkv, gate_up
        self.o_proj, self.down_proj = attn.o_proj, layer.mlp.down_proj
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        d = attn.head_dim
        self.split = (attn.n_heads * d, attn.n_kv_heads * d, attn.n_kv_heads * d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache=None) -> Tensor:
        """llama.DecoderLayer.forward for x [B, T, hidden] in fp16/bf16."""
        B, T, H = x.shape
        x2 = x.reshape(B * T, H)
        qkv = self.qkv(x2, "rmsnorm", self.norm1.weight, self.norm1.eps)
        out = attend_qkv(self.attn, qkv, self.split, B, T, cos, sin, kv_cache)
        h = self.o_proj(out.reshape(B * T, -1), residual=x2)
        gate_up = self.gate_up(h, "rmsnorm", self.norm2.weight, self.norm2.eps)
        return self.down_proj(gate_up, "silu_mul", residual=h, input_permuted=True).view(B, T, H)


class RegroupedModel(nn.Module):
    """llama.LlamaModel.forward over regrouped layers (FusedAtomLayer, MergedProjectionLayer; embedding,
    RoPE and final norm shared with the model)."""

    def __init__(self, model, layers: list[nn.Module]):
        super().__init__()
        self.inner = model.model
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, kv_cache=None) -> Tensor:
        return self.inner(input_ids, positions, kv_cache, layers=self.layers)


def fuse_atom_layers(model) -> RegroupedModel | None:
    """The serving body of an Atom model in fp16/bf16 whose every layer can be regrouped, else None."""
    if model.model.embed_tokens.weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    layers = list(model.model.layers)
    groups = projection_groups(layers)
    if not all(_share_quantization(qkv) and _share_quantization(gate_up) and _bias_free_atom(layer.self_attn.o_proj)
               and _bias_free_atom(layer.mlp.down_proj) for layer, (qkv, gate_up) in zip(layers, groups)):
        return None  # checked for every layer before copying any weight
    return RegroupedModel(model, [FusedAtomLayer(layer, concat_linears(qkv),
                                                 concat_linears(gate_up, row_order=layer.mlp.down_proj.perm))
                                  for layer, (qkv, gate_up) in zip(layers, groups)])


# ------------------------------------------------------------------ fp16 / fp8 models: merged projections

class MergedProjectionLayer(nn.Module):
    """llama.DecoderLayer with q|k|v and gate|up each one GEMM (for fp8, one activation quantization):
    what serving stacks do for every dtype (vLLM's QKVParallelLinear, MergedColumnParallelLinear), so
    the fp16 and fp8 baselines get the regrouping the Atom layers get. Same ops otherwise, but for the
    fused RMSNorm and SiLU-and-multiply kernels on a GPU (rms_norm, silu_mul_down)."""

    def __init__(self, layer, qkv: nn.Module, gate_up: nn.Module):
        super().__init__()
        attn = layer.self_attn
        self.attn, self.mlp, self.qkv, self.gate_up = attn, layer.mlp, qkv, gate_up
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        d = attn.head_dim
        self.split = (attn.n_heads * d, attn.n_kv_heads * d, attn.n_kv_heads * d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache=None) -> Tensor:
        B, T, H = x.shape
        qkv = self.qkv(rms_norm(self.norm1, x)).reshape(B * T, -1)
        x = x + self.attn.o_proj(attend_qkv(self.attn, qkv, self.split, B, T, cos, sin, kv_cache))
        return x + silu_mul_down(self.mlp.down_proj, self.gate_up(rms_norm(self.norm2, x)))


def rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """The baseline modes' RMSNorm: on a GPU torch's fused kernel (F.rms_norm, one launch) as a
    serving stack runs it, instead of the model's HF-order sequence (fp32 cast, pow, mean, rsqrt,
    two multiplies, cast back: ~7 kernels and fp32 intermediates per call). It rounds once where HF
    rounds the normalized value before the weight multiply, so outputs can differ by an fp16 ulp.
    On the CPU the model's own module (the reference's numerics)."""
    if x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


def silu_mul_down(down: nn.Module, gate_up: Tensor) -> Tensor:
    """down(silu(gate) * up) for gate_up = [gate | up]: the baseline modes' MLP tail with the activation
    in one kernel on a GPU, as a serving stack runs it (vLLM's silu_and_mul; for fp8 fused with the
    per-token quantization), where the model's F.silu(gate) * up is two elementwise passes (three
    with the fp8 quantization). Same bits either way (atom_ops.kernels.silu_mul, fp8_quantize_rows)."""
    from .fp8 import Fp8Linear

    if isinstance(down, Fp8Linear):
        return down(gate_up, silu_mul=True)
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    differentiable = torch.is_grad_enabled() and gate_up.requires_grad  # the kernel has no backward
    fused = kernels.silu_mul(rows) if gate_up.is_cuda and not differentiable else None
    if fused is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return down(F.silu(gate) * up)
    return down(fused.view(*gate_up.shape[:-1], -1))


def stackable(lins: list[nn.Module]) -> bool:
    """Whether stack_linears takes these: all nn.Linear or all bias-free Fp8Linear, one input size."""
    from .fp8 import Fp8Linear

    first = lins[0]
    same = all(type(m) is type(first) and m.in_features == first.in_features for m in lins)
    if type(first) is nn.Linear:
        return same and all((m.bias is None) == (first.bias is None) for m in lins)
    return same and type(first) is Fp8Linear and all(m.bias is None for m in lins)


def stack_linears(lins: list[nn.Module]) -> nn.Module:
    """One module computing all `lins` (stackable; outputs concatenated in order). The stacked weights
    are new tensors and each original's weights become views of its rows in them, so nothing is held
    twice and the model computes as before."""
    from .fp8 import Fp8Linear

    first, n = lins[0], sum(m.out_features for m in lins)
    if type(first) is Fp8Linear:  # [N, K] e4m3 rows, [1, N] scales
        return Fp8Linear.from_quantized(_restack(lins, "weight_fp8", 0), _restack(lins, "weight_scale", 1))
    out = nn.Linear(first.in_features, n, bias=first.bias is not None, device="meta")
    out.weight = nn.Parameter(_restack(lins, "weight", 0), requires_grad=False)
    if first.bias is not None:
        out.bias = nn.Parameter(_restack(lins, "bias", 0), requires_grad=False)
    return out


def _restack(lins: list[nn.Module], name: str, dim: int) -> Tensor:
    """The lins' tensors `name` concatenated along dim; each lin's own becomes a view of its part
    (a Parameter stays a Parameter with its requires_grad, a buffer a buffer). Tensors that already
    are consecutive parts of one storage (an earlier engine's restack) are viewed, not copied again."""
    parts = [getattr(m, name) for m in lins]
    joined = _joined_view(parts, dim)
    if joined is not None:
        return joined
    stacked = torch.cat([t.detach() for t in parts], dim=dim)
    start = 0
    for m, old in zip(lins, parts):
        part = stacked.narrow(dim, start, old.shape[dim])
        setattr(m, name, nn.Parameter(part, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else part)
        start += old.shape[dim]
    return stacked


def _joined_view(parts: list[Tensor], dim: int) -> Tensor | None:
    """torch.cat(parts, dim) as a view when they lie back to back in one storage in order
    (contiguous, and `dim` the first dimension of size > 1, so concatenation is adjacency)."""
    first = parts[0]
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in parts)
    if any(n != 1 for n in first.shape[:dim]) or not all(t.is_contiguous() for t in parts):
        return None
    storage, offset = first.untyped_storage(), first.storage_offset()
    for t in parts:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, first.storage_offset(), shape).detach()


def merge_projections(model) -> RegroupedModel | None:
    """The serving body of an fp16 / fp8 model with q|k|v and gate|up merged in every layer (Llama's
    MLP: gate and up of one size), else None (other projection types, e.g. an Atom model's)."""
    layers = list(model.model.layers)
    groups = projection_groups(layers)
    if not all(stackable(qkv) and stackable(gate_up) and gate_up[0].out_features == gate_up[1].out_features
               for qkv, gate_up in groups):
        return None  # checked for every layer before any weight is restacked
    return RegroupedModel(model, [MergedProjectionLayer(layer, stack_linears(qkv), stack_linears(gate_up))
                                  for layer, (qkv, gate_up) in zip(layers, groups)])
