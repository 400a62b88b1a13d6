"""A small Llama runtime: loading (GGUF, HF), the Atom quantization pipeline, evaluation, CLI."""
