"""Perplexity through the serving path: what the engine computes, not the plain model.

models.eval.perplexity runs the model's own forward (AtomLinears one by one, KV4 simulated by
fake quantization). A served Atom model runs other code: the regrouped layers (q|k|v and gate|up
one GEMM each, RMSNorm and SiLU inside the quantization kernel, residuals in the GEMM epilogue;
fused_layers.py), K and V stored into the paged cache (KV4 pages through the append kernel on a
GPU) and attention over what was stored. served_perplexity scores each window as one packed
prefill of the engine's ModelRunner over freshly allocated pages, with logits at every position,
so its figure is the served model's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .attention import PagedBatch, shape_stable_sdpa
from .kv_cache import pages_for


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
    ps, dev = engine.config.page_size, engine.device
    pages = engine.allocator.allocate(pages_for(T, ps))
    try:
        positions = np.arange(T)
        slots = np.asarray(pages, dtype=np.int64)[positions // ps] * ps + positions % ps
        ids = window.to(device=dev, dtype=torch.long)[None]
        batch = PagedBatch(engine.pages, torch.tensor([pages], device=dev), torch.tensor([T], device=dev),
                           torch.from_numpy(slots).to(dev), segments=((T, T),))
        with shape_stable_sdpa():
            hidden = engine.runner.body(ids, torch.arange(T, device=dev)[None], batch)[0]
        logits = engine.model.lm_head(hidden[:-1]).float()
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        return float(nll), T - 1
    finally:
        engine.allocator.free(pages)


def served_perplexity(engine, windows: torch.Tensor, progress: bool = True) -> float:
    """exp(mean next-token NLL) over windows [n, T] scored independently (models.eval.perplexity's
    protocol) through the engine's serving path."""
    nll, count = 0.0, 0
    for window in tqdm(windows, desc="served perplexity", disable=not progress):
        n, c = served_nll(engine, window)
        nll, count = nll + n, count + c
    return math.exp(nll / count)
