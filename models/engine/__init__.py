"""The serving engine: paged KV cache (float or KV4 pages), paged attention (KV4 kernels on a GPU),
continuous-batching scheduler, sampling, CUDA-graph decode (GPU), and a background loop for
the HTTP server (models/server.py).

    kv_cache.py     page pool, page formats, allocator
    attention.py    paged attention (atom_ops' KV4 kernels or torch) and the step's batch
    scheduler.py    admission, prefill chunks, decode batches, preemption when pages run out
    runner.py       runs the model for a prefill chunk or a decode batch
    cuda_graphs.py  captured decode steps per batch bucket (GPU only)
    sampling.py     per-request settings, greedy / temperature / top-p with per-request seeds
    engine.py       Engine: add_request / step / abort, generate
    loop.py         EngineLoop: the Engine in a background thread for asyncio callers
    modes.py        fp16 / fp8 / atom model loading
    fp8.py          W8A8 FP8 linears via torch._scaled_mm (GPU only)
    text.py         chat template, streaming detokenization with stop strings
    scoring.py      perplexity through the serving path (packed prefill over the paged cache)
"""

from .engine import Completion, Engine, EngineConfig, RequestOutput
from .loop import EngineLoop, QueueFull
from .sampling import RequestError, SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "EngineLoop", "QueueFull", "RequestError",
           "RequestOutput", "SamplingParams"]
