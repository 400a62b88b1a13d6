"""Perplexity through the serving path: what the engine computes, not the plain model.

models.eval.perplexity runs the model's own forward (AtomLinears one by one, KV4 simulated by
fake quantization). A served Atom model runs other code: the regrouped layers (q|k|v and gate|up
one GEMM each, RMSNorm and SiLU inside the quantization kernel, residuals in the GEMM epilogue;
fused_layers.py), K and V stored into the paged cache (KV4 pages through the append kernel on a
GPU) and attention over what was stored. served_perplexity scores each window as one packed
prefill of the engine's ModelRunner (prefill_hidden) over freshly allocated pages, with logits at
every position, so its figure is the served model's.
"""

from __future__ import annotations

import torch

from ..eval import next_token_nll, perplexity_of
from .kv_cache import pages_for
from .sampling import SamplingParams
from .scheduler import Sequence


@torch.no_grad()
def served_nll(engine, window: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one window [T] of token ids (each token after the first predicted
    from those before it) through engine's serving path -> (nll, T - 1). The window must fit the
    engine's max_context; its pages are freed afterwards (the engine must be idle: it uses the same
    page pool as requests)."""
    T = int(window.numel())
    if T < 2 or T > engine.max_context:
        raise ValueError(f"a scored window needs 2..{engine.max_context} tokens (the engine's max_context), got {T}")
    if engine.has_work():
        raise RuntimeError("served_nll needs an idle engine (it borrows pages from the request pool)")
    seq = Sequence("served-nll", window.tolist(), SamplingParams(), 0, None)
    seq.pages = engine.allocator.allocate(pages_for(T, engine.config.page_size))
    try:
        hidden, _ = engine.runner.prefill_hidden([(seq, T)])
        return next_token_nll(engine.model.lm_head(hidden), window.to(hidden.device))
    finally:
        engine.allocator.free(seq.pages)


def served_perplexity(engine, windows: torch.Tensor, progress: bool = True) -> float:
    """exp(mean next-token NLL) over windows [n, T] scored independently (models.eval.perplexity's
    protocol) through the engine's serving path."""
    return perplexity_of(lambda w: served_nll(engine, w[0]), windows, 1, "served perplexity", progress)


def served_model_perplexity(model, windows: torch.Tensor, kv_format: str | None = None) -> float:
    """served_perplexity through a fresh Engine for `model` (batch 1, context = the window length,
    regrouped layers); `kv_format` ("kv4" / "float"), when given, is the page format the engine must
    pick (a check that the path under test is the one meant)."""
    from .engine import Engine, EngineConfig

    engine = Engine(model, EngineConfig(max_batch=1, max_context=windows.shape[1], kv_cache_bytes=1 << 28))
    if kv_format is not None and (engine.kv_format != kv_format or engine.fused is None):
        raise RuntimeError(f"expected {kv_format} pages and regrouped layers, got {engine.kv_format} pages"
                           f"{'' if engine.fused is not None else ' without regrouped layers'}")
    return served_perplexity(engine, windows, progress=False)
