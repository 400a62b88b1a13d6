"""The decoder layers of an Atom model regrouped for serving: one kernel pair per projection group.

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
from torch import Tensor, nn

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
        a = self.attn
        x2 = x.reshape(B * T, H)
        qkv = self.qkv(x2, "rmsnorm", self.norm1.weight, self.norm1.eps)
        q, k, v = (t.view(B, T, -1, a.head_dim).transpose(1, 2) for t in qkv.split(self.split, dim=-1))
        q = apply_rope(q, cos, sin)
        if kv_cache is not None:
            out = kv_cache.attend(q, k, v, cos, sin)
        else:  # plain forward (no cache), as llama.Attention does it
            k = apply_rope(k, cos, sin)
            if a.kv_quantizer is not None:
                k, v = a.kv_quantizer(k, v)
            out = a._attend(q, k, v)
        h = self.o_proj(out.transpose(1, 2).reshape(B * T, -1), residual=x2)
        gate_up = self.gate_up(h, "rmsnorm", self.norm2.weight, self.norm2.eps)
        return self.down_proj(gate_up, "silu_mul", residual=h, input_permuted=True).view(B, T, H)


class FusedAtomModel(nn.Module):
    """llama.LlamaModel.forward over FusedAtomLayers (embedding, RoPE and final norm shared with
    the model)."""

    def __init__(self, model, layers: list[FusedAtomLayer]):
        super().__init__()
        self.inner = model.model
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, kv_cache=None) -> Tensor:
        return self.inner(input_ids, positions, kv_cache, layers=self.layers)


def fuse_atom_layers(model) -> FusedAtomModel | None:
    """The serving body of an Atom model in fp16/bf16 whose every layer can be regrouped, else None."""
    if model.model.embed_tokens.weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    layers = list(model.model.layers)
    groups = [([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
               [layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in layers]
    if not all(_share_quantization(qkv) and _share_quantization(gate_up) and _bias_free_atom(layer.self_attn.o_proj)
               and _bias_free_atom(layer.mlp.down_proj) for layer, (qkv, gate_up) in zip(layers, groups)):
        return None  # checked for every layer before copying any weight
    return FusedAtomModel(model, [FusedAtomLayer(layer, concat_linears(qkv),
                                                 concat_linears(gate_up, row_order=layer.mlp.down_proj.perm))
                                  for layer, (qkv, gate_up) in zip(layers, groups)])
