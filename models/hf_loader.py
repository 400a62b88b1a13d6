"""Load an HF-format Llama directory: config.json, *.safetensors (single or sharded), tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import LlamaConfig
from .llama import LlamaForCausalLM
from .tokenizer import Tokenizer

_INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF directory: the sharded index's files, or every *.safetensors."""
    index = path / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists missing shards: {absent}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path} (pytorch_model.bin is not supported)")
    return files


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in safetensors_files(Path(path)):
        state_dict.update(load_file(str(file)))
    # Old checkpoints saved the RoPE buffer; it is recomputed from the config here.
    return {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, LlamaConfig]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"HF model directory not found: {path}")
    config = LlamaConfig.from_json(path / "config.json")
    model = LlamaForCausalLM.from_state_dict(config, load_hf_state_dict(path), dtype, device, source=str(path))
    return model, config


def load_hf_tokenizer(path: str | Path, config: LlamaConfig) -> Tokenizer:
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos  # Llama 3 lists several; the first is the default
    return Tokenizer.from_hf_dir(path, config.bos_token_id, eos)
