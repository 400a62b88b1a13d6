"""The three serving modes, one code path: load the model for a mode, hand it to the Engine.

- fp16: the floating-point model (fp16 on a GPU; fp32 on the CPU, where fp16 matmuls are slow
  and the reference ops compute in fp32 anyway), float KV pages.
- fp8:  the same model with W8A8 FP8 projections (fp8.py), float KV pages. GPU only.
- atom: a checkpoint saved by `python -m models quantize` (W4A4 + INT8 outliers through
  atom_ops), KV4 pages when it was quantized with --kv-bits 4 (the default).
"""

from __future__ import annotations

from pathlib import Path

import torch

MODES = ("auto", "fp16", "fp8", "atom")


def is_checkpoint(path: str | None) -> bool:
    return bool(path) and (Path(path) / "atom_quant.json").is_file()


def resolve_mode(mode: str, path: str | None) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "auto":
        return "atom" if is_checkpoint(path) else "fp16"
    return mode


def load_for_mode(mode: str, path: str | None, device: str):
    """-> (model, tokenizer, mode, name). `path`: checkpoint dir (atom), GGUF / HF dir (fp16, fp8),
    or None for the shipped SmolLM2."""
    mode = resolve_mode(mode, path)
    dev = torch.device(device)
    if mode == "fp8" and dev.type != "cuda":
        raise ValueError("fp8 mode needs a CUDA GPU with FP8 tensor cores (torch._scaled_mm); "
                         "use --mode fp16 or atom on the CPU")
    if mode == "atom":
        if not is_checkpoint(path):
            raise ValueError(f"atom mode needs a checkpoint directory saved by `python -m models quantize` "
                             f"(with atom_quant.json); got {path!r}")
        from ..checkpoint import load_checkpoint

        model, tok, _meta = load_checkpoint(path, dev)
        if dev.type == "cuda":
            model = _to_half(model, dev)
        return model, tok, mode, f"atom:{path}"
    if is_checkpoint(path):
        raise ValueError(f"{path} is an Atom checkpoint: serve it in atom mode (or auto)")
    from ..loading import load_model

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model, tok, _cfg = load_model(path, dtype=dtype, device=dev)
    if mode == "fp8":
        from .fp8 import convert_to_fp8

        convert_to_fp8(model)
    return model, tok, mode, f"{mode}:{path or 'smollm2-135m'}"


def _to_half(model, device):
    """fp16 activations for the W4A4 kernels; packed ints and fp16 scales are unchanged by .half()."""
    model = model.half()
    model.model.rotary_emb.reset_buffers(device)  # inv_freq is computed in fp32
    return model
