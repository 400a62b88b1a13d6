"""Load a llama.cpp GGUF file: config from metadata, dequantized weights under HF names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import LlamaConfig
from .llama import LlamaForCausalLM, expected_shapes

try:
    import gguf
except ImportError as e:  # pragma: no cover - gguf is a hard dependency of the package
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e

Q = gguf.GGMLQuantizationType
# Types we dequantize (through gguf.quants.dequantize); anything else is refused by name.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFError(ValueError):
    """A GGUF file this runtime cannot load (the message names the file and, if any, the tensor)."""


_MISSING = object()


def open_gguf(path: str | Path) -> "gguf.GGUFReader":
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on anything not GGUF
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def metadata(reader: "gguf.GGUFReader", key: str, default: Any = _MISSING) -> Any:
    """One metadata value as a Python object (str, int, float, bool or list)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFError(f"{reader.data.filename}: metadata key {key!r} is missing")
        return default
    return field.contents()


def config_from_gguf(reader: "gguf.GGUFReader") -> LlamaConfig:
    """The LlamaConfig a GGUF's `llama.*` metadata describes."""
    path = reader.data.filename
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; only 'llama' is")

    def md(key: str, default: Any = _MISSING) -> Any:
        return metadata(reader, f"llama.{key}", default)

    hidden, n_heads = md("embedding_length"), md("attention.head_count")
    head_dim = md("attention.key_length", hidden // n_heads)
    rope_dim = md("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: partial rotary (rope.dimension_count={rope_dim} != head_dim={head_dim}) "
                        "is not supported")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (llama3-style RoPE frequency factors) "
                        "is not supported; load the HF directory instead")
    tokens = metadata(reader, "tokenizer.ggml.tokens", None)
    return LlamaConfig(
        vocab_size=len(tokens) if tokens is not None else md("vocab_size"),
        hidden_size=hidden,
        intermediate_size=md("feed_forward_length"),
        num_hidden_layers=md("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=md("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rms_norm_eps=_f32(md("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(md("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader),
        max_position_embeddings=md("context_length", 2048),
        # llama.cpp writes no output.weight when the head shares the embedding.
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id", None),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_gate.bias" in tensor_names,
    )


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _rope_scaling(reader: "gguf.GGUFReader") -> dict | None:
    kind = metadata(reader, "llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise GGUFError(f"{reader.data.filename}: rope scaling type {kind!r} is not supported "
                        "(GGUF: only 'linear')")
    return {"rope_type": "linear", "factor": _f32(metadata(reader, "llama.rope.scaling.factor"))}


def hf_name(gguf_name: str) -> str | None:
    """HF state_dict key of a llama.cpp tensor name, or None if it is not one we know."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's rotate_half halves."""
    head_dim = w.shape[0] // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor: "gguf.ReaderTensor", path: str | Path = "") -> np.ndarray:
    """float32 array in numpy (row-major) order; GGUF lists dims fastest-first, so reverse them."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, not supported; "
                        f"supported: {[t.name for t in SUPPORTED_TYPES]}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def load_gguf_state_dict(reader: "gguf.GGUFReader", config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Dequantized float32 weights under HF names, each shape checked against `config` before
    dequantizing (missing tensors are caught when the model adopts them)."""
    path = reader.data.filename
    expected = expected_shapes(config)
    state_dict = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise GGUFError(f"{path}: unexpected tensor {tensor.name!r} for a llama model")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if expected.get(name) != shape:
            raise GGUFError(f"{path}: tensor {tensor.name!r} ({name}) has shape {shape}, "
                            f"the config in its metadata expects {expected.get(name)}")
        w = dequantize_tensor(tensor, path)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        # F32 tensors come back as read-only views of the memory-mapped file: copy those.
        state_dict[name] = torch.from_numpy(w if w.flags.writeable else w.copy())
    return state_dict


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, LlamaConfig, "gguf.GGUFReader"]:
    """(model, config, reader) from a llama GGUF; the reader also feeds the tokenizer."""
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    state_dict = load_gguf_state_dict(reader, config)
    model = LlamaForCausalLM.from_state_dict(config, state_dict, dtype, device, source=str(path))
    return model, config, reader
