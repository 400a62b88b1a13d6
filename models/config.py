"""Llama model configuration: HF config.json fields, named presets, and the linear shapes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A model config that this runtime cannot run."""


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True)
class LlamaConfig:
    """The subset of HF LlamaConfig this runtime implements (same field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    attention_bias: bool = False
    mlp_bias: bool = False
    architectures: tuple[str, ...] = field(default=("LlamaForCausalLM",))

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        archs = tuple(self.architectures or ("LlamaForCausalLM",))
        object.__setattr__(self, "architectures", archs)
        unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if unsupported:
            raise ConfigError(f"unsupported architecture {unsupported}; supported: {SUPPORTED_ARCHITECTURES}")
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: {SUPPORTED_ROPE_TYPES}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if d.get("model_type") not in (None, "llama"):
            raise ConfigError(f"unsupported model_type {d.get('model_type')!r}; only 'llama' is supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu' is supported")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.update(_rope_fields(d.get("rope_parameters")))
        if "architectures" in kwargs and kwargs["architectures"] is not None:
            kwargs["architectures"] = tuple(kwargs["architectures"])
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if n not in kwargs]
        if missing:
            raise ConfigError(f"config is missing required fields {missing}")
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["architectures"] = list(self.architectures)
        d["model_type"] = "llama"
        return d

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of every linear of one decoder layer, fused as the runtime runs them."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return {
            "qkv": (q + 2 * kv, h),
            "o": (h, q),
            "gate_up": (2 * self.intermediate_size, h),
            "down": (h, self.intermediate_size),
        }


def _rope_fields(rope_parameters: dict | None) -> dict:
    """rope_theta / rope_scaling from transformers>=5's `rope_parameters` (which replaces both)."""
    if not rope_parameters:
        return {}
    rp = dict(rope_parameters)
    out = {"rope_theta": rp.pop("rope_theta")} if "rope_theta" in rp else {}
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        out["rope_scaling"] = rp
    return out


PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                               num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                               max_position_embeddings=4096),
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              rope_theta=500000.0, max_position_embeddings=8192,
                              bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
