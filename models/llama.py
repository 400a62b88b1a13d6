"""A plain-torch Llama in gpt-fast's shape: small modules, HF module tree and state_dict keys.

The projections are plain `nn.Linear` modules that a quantization pass may swap for any module
with the same `forward(x)`, so nothing here reads a projection's `.weight`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atom_ops import rope

from .config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 and cast back before the scale, as HF does (matters for bf16/fp16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_type(config: LlamaConfig) -> str:
    rs = config.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


def rope_inv_freq(config: LlamaConfig, seq_len: int | None = None, device=None) -> Tensor:
    """fp32 inverse frequencies [head_dim // 2], as HF's ROPE_INIT_FUNCTIONS compute them.

    `seq_len` only matters for "dynamic" (NTK) scaling, which changes the base once a sequence
    is longer than max_position_embeddings.
    """
    dim, base, rs = config.head_dim, config.rope_theta, config.rope_scaling or {}
    kind = rope_type(config)
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = rs["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rs)
    return inv_freq


def _llama3_inv_freq(inv_freq: Tensor, rs: dict) -> Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between smoothed.
    factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, HF layout (the two halves repeat the same frequencies)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # Non-persistent, so it never appears in the state_dict (HF does the same).
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute inv_freq in fp32 (after a meta-device build or a dtype cast)."""
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> cos, sin [B, T, head_dim] in `dtype`."""
        inv_freq = self.inv_freq.float()
        if rope_type(self.config) == "dynamic":
            inv_freq = rope_inv_freq(self.config, int(positions.max()) + 1, positions.device)
        freqs = positions[..., None].float() * inv_freq  # fp32, like HF's autocast-disabled matmul
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]: x * cos + rotate_half(x) * sin. fp16 / bf16 on a GPU
    (without autograd): one kernel, bit-exact with the torch formula (atom_ops.rope)."""
    if rope.runs_kernel(x) and not (x.requires_grad and torch.is_grad_enabled()):  # the op has no backward
        return rope.apply_rope(x, cos, sin)
    return rope.apply_rope_reference(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=bias)
        # Optional `k, v = kv_quantizer(k, v)` on [B, n_kv_heads, T, head_dim] after RoPE,
        # e.g. to simulate a 4-bit KV cache.
        self.kv_quantizer = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache=None) -> Tensor:
        """`kv_cache`: None (attend over x alone), or one layer's view of a paged cache with
        `attend(q, k, v, cos, sin) -> out` (q after RoPE, k before it), which applies RoPE to k as it
        stores k, v in its own page format (fp or KV4; fused into the KV4 store kernel on a GPU) and
        attends over the cached prefix plus the new tokens (models/engine)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        if kv_cache is not None:
            out = kv_cache.attend(q, k, v, cos, sin)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        k = apply_rope(k, cos, sin)
        if self.kv_quantizer is not None:
            k, v = self.kv_quantizer(k, v)
        out = self._attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # GQA: each kv head serves n_heads / n_kv_heads consecutive query heads; SDPA's enable_gqa
        # gives the bits of repeating K and V per query head, without the copy
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.head_dim ** -0.5,
                                              enable_gqa=self.n_heads != self.n_kv_heads)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache=None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, kv_cache=None, layers=None) -> Tensor:
        """`kv_cache`: None, or a paged-cache batch with `layer(i)` -> that layer's view. `layers`: other
        modules to run in place of self.layers, same call signature (the engine's fused Atom layers)."""
        x = self.embed_tokens(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.expand(input_ids.shape[0], -1)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.layers if layers is None else layers):
            x = layer(x, cos, sin, None if kv_cache is None else kv_cache.layer(i))
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """HF `LlamaForCausalLM`-compatible: same module names, same state_dict keys, same logits."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, kv_cache=None) -> Tensor:
        """input_ids [B, T] (positions [T] or [B, T], default 0..T-1) -> fp32 logits [B, T, vocab]."""
        return self.lm_head(self.model(input_ids, positions, kv_cache)).float()

    @classmethod
    def from_state_dict(cls, config: LlamaConfig, state_dict: dict[str, Tensor],
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        source: str = "state_dict") -> "LlamaForCausalLM":
        """Build on the meta device and adopt `state_dict` (HF key names) without a second copy.

        A tied checkpoint may omit lm_head.weight; `source` names the checkpoint in errors.
        """
        with torch.device("meta"):
            model = cls(config)
        tied = config.tie_word_embeddings
        check_state_dict(_shapes(model.state_dict()), _shapes(state_dict), tied, source)
        state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()
                      if not (tied and k == "lm_head.weight")}
        model.load_state_dict(state_dict, strict=False, assign=True)
        model.tie_weights()
        model.model.rotary_emb.reset_buffers(device)
        return model.eval()


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of the model and its shape (built on the meta device, so free)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return _shapes(model.state_dict())


def _shapes(state_dict: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def check_state_dict(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]],
                     tied: bool, source: str) -> None:
    """Raise ValueError naming `source` unless `shapes` (key -> shape) is exactly `expected`
    (a tied model may lack lm_head.weight)."""
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(expected.keys() - optional - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the config: missing {_head(missing)}, "
                         f"unexpected {_head(unexpected)}")
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(shape)}, "
                             f"the config expects {expected[name]}")


def _head(names: list[str], n: int = 8) -> str:
    return str(names[:n])[:-1] + (", ...]" if len(names) > n else "]")
