"""The linear shapes (N, K) a model runs: a preset, an HF config.json, or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LinearShape:
    n: int
    k: int
    layers: tuple[str, ...]   # "model/layer" labels that share this (N, K)


def model_config(model: str):
    """A models.config.LlamaConfig from a preset name, an HF config.json or a .gguf file."""
    from models.config import LlamaConfig, PRESETS

    if model.endswith(".gguf"):
        from models.gguf_loader import config_from_gguf, open_gguf   # needs the gguf package
        return config_from_gguf(open_gguf(model))
    if model.endswith(".json"):
        return LlamaConfig.from_json(model)
    if model in PRESETS:
        return PRESETS[model]
    raise ValueError(f"unknown model {model!r}: give a preset ({', '.join(sorted(PRESETS))}), "
                     "an HF config.json or a .gguf file")


def model_shapes(models: list[str]) -> list[LinearShape]:
    """Distinct (N, K) over the models' linears, in first-seen order (one study per shape)."""
    seen: dict[tuple[int, int], list[str]] = {}
    for model in models:
        label = Path(model).stem if model.endswith((".json", ".gguf")) else model
        for layer, (n, k) in model_config(model).linear_shapes().items():
            seen.setdefault((n, k), []).append(f"{label}/{layer}")
    return [LinearShape(n, k, tuple(labels)) for (n, k), labels in seen.items()]
