"""The decoder layers of an Atom model regrouped for serving: one kernel pair per projection group.

A checkpoint's layer has seven AtomLinears and two RMSNorms in torch (models/llama.py), so every
token pays the torch RMSNorm, three quantizations of the same normalized input (q, k, v), two of
the next one (gate, up), a torch SiLU-mul and two torch residual adds. The quantization recipe gives
q/k/v and gate/up one shared channel permutation, spec and clip (models/quantize.py), so here:

    qkv      = AtomLinear(q|k|v rows)    prologue RMSNorm(input_layernorm)      one quantization
    x       += o_proj(attention)         residual added in the GEMM epilogue
    gate_up  = AtomLinear(gate|up rows)  prologue RMSNorm(post_attention_layernorm)
    x       += down_proj(gate_up)        prologue SiLU(gate) * up, residual in the epilogue

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


def concat_linears(lins: list[nn.Module]) -> AtomLinear | None:
    """One AtomLinear computing all `lins` (rows stacked in order), or None when they differ in
    what the shared quantization needs (spec, permutation, clip) or carry a bias."""
    first = lins[0]
    if not all(isinstance(m, AtomLinear) and m.bias is None for m in lins):
        return None
    if any(m.spec != first.spec or m.act_clip != first.act_clip or not torch.equal(m.perm, first.perm) for m in lins):
        return None
    out = AtomLinear(first.in_features, sum(m.out_features for m in lins), first.spec, first.act_clip)
    out.weight_packed = torch.cat([m.weight_packed for m in lins])
    out.weight_outlier = torch.cat([m.weight_outlier for m in lins])
    out.weight_scale = torch.cat([m.weight_scale for m in lins])
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
        return self.down_proj(gate_up, "silu_mul", residual=h).view(B, T, H)


class FusedAtomModel(nn.Module):
    """llama.LlamaModel.forward over FusedAtomLayers (embedding, RoPE and final norm shared with
    the model)."""

    def __init__(self, model, layers: list[FusedAtomLayer]):
        super().__init__()
        self.inner = model.model
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, kv_cache=None) -> Tensor:
        m = self.inner
        x = m.embed_tokens(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = m.rotary_emb(positions.expand(input_ids.shape[0], -1), x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if kv_cache is None else kv_cache.layer(i))
        return m.norm(x)


def fuse_atom_layers(model) -> FusedAtomModel | None:
    """The serving body of an Atom model in fp16/bf16 whose every layer can be regrouped, else None."""
    if model.model.embed_tokens.weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    fused = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv = concat_linears([a.q_proj, a.k_proj, a.v_proj])
        gate_up = concat_linears([mlp.gate_proj, mlp.up_proj])
        if qkv is None or gate_up is None or not all(isinstance(m, AtomLinear) and m.bias is None
                                                     for m in (a.o_proj, mlp.down_proj)):
            return None
        fused.append(FusedAtomLayer(layer, qkv, gate_up))
    return FusedAtomModel(model, fused)
