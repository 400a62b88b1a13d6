"""Save and load Atom-quantized checkpoints.

A checkpoint is a directory:
    config.json         the model's HF-style config
    tokenizer.json      HF tokenizers file (so the directory is self-contained)
    atom_quant.json     {"format": FORMAT, "format_version": N, "recipe": {...},
                         "layers": {name: {"n", "k", "group", "outliers", "act_clip",
                                           "weight_clip", "rel_error"}},
                         "kv_cache": {"bits", "group"}, "calibration": {...}, "source": ...}
    model.safetensors   AtomLinear buffers (weight_packed uint8, weight_outlier int8,
                        weight_scale fp16, perm int64) and every unquantized tensor.
Loading refuses a checkpoint whose format, version or tensor shapes do not match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atom_ops.formats import QuantSpec

from .config import LlamaConfig
from .llama import LlamaForCausalLM
from .quantize import QuantizationReport, _set
from .quantized_linear import AtomLinear, KV4Quantizer
from .recipe import Recipe
from .tokenizer import Tokenizer

FORMAT = "atom-kernels/w4a4-checkpoint"
FORMAT_VERSION = 1
META_FILE = "atom_quant.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    pass


def save_checkpoint(out_dir: str | Path, model: LlamaForCausalLM, tokenizer: Tokenizer,
                    report: QuantizationReport, extra: dict | None = None) -> Path:
    recipe = report.recipe
    if not (recipe.w_bits == 4 and recipe.a_bits == 4):
        raise CheckpointError(f"only W4A4 recipes are saved; {recipe} is an evaluation-only reference")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tokenizer.tok.save(str(out / "tokenizer.json"))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "layers": {r.name: r.to_dict() | {"act_clip": recipe.act_clip} for r in report.layers},
        "kv_cache": {"bits": recipe.kv_bits, "group": recipe.kv_group},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    file = path / META_FILE
    if not file.is_file():
        raise FileNotFoundError(f"not an Atom checkpoint: {file} is missing")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint metadata {file}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {meta.get('format_version')} is not supported "
                              f"(this build reads version {FORMAT_VERSION}); re-run `python -m models quantize`")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """-> (model, tokenizer, meta). The model runs AtomLinear layers through atom_ops."""
    path = Path(path)
    meta = read_meta(path)
    config = LlamaConfig.from_json(path / "config.json")
    tokenizer = Tokenizer.from_hf_dir(path, config.bos_token_id,
                                      config.eos_token_id if isinstance(config.eos_token_id, int) else None)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {weights_file}")
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own types for truncated/corrupt files
        raise CheckpointError(f"corrupt checkpoint weights {weights_file}: {e}") from None
    dtype = getattr(torch, meta.get("dtype", "float32"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    recipe = Recipe.from_dict(meta["recipe"])
    for name, info in meta["layers"].items():
        n, k = info["n"], info["k"]
        spec = QuantSpec(k, info["group"], info["outliers"])
        with torch.device("meta"):
            _set(model, name, AtomLinear(k, n, spec, info["act_clip"], bias=f"{name}.bias" in state))
        for field in ("weight_packed", "weight_outlier", "weight_scale", "perm"):
            key = f"{name}.{field}"
            if key not in state:
                raise CheckpointError(f"{weights_file}: tensor {key!r} is missing")
    if recipe.kv_bits == 4:
        for layer in model.model.layers:
            layer.self_attn.kv_quantizer = KV4Quantizer(recipe.kv_group)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: tensors do not match the metadata: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, (shape, dt) in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{weights_file}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
        if dt.is_floating_point != t.dtype.is_floating_point or (not dt.is_floating_point and dt != t.dtype):
            raise CheckpointError(f"{weights_file}: tensor {key!r} has dtype {t.dtype}, expected {dt}")
    # scales keep their fp16 format; every other float tensor takes the model's dtype
    state = {k: (v.to(dtype) if v.dtype.is_floating_point and not k.endswith("weight_scale") else v).to(device)
             for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.reset_buffers(device)
    return model.eval(), tokenizer, meta
