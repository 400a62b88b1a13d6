"""torch SDPA backends at a serving engine's prefill shapes: what a new prompt length costs.

    python -m bench.sdpa_backends [--lengths 12] [--iters 20] [--out bench/results] [--tag h100]

cuDNN's attention builds an execution plan for every new shape, so the first call at each new
prompt length pays for a build; torch's flash and memory-efficient kernels need none. Per backend
(torch's default choice, cuDNN, flash, memory-efficient, and the engine's list
`models.engine.attention.SHAPE_STABLE_BACKENDS`), fp16, 32 heads of 128: the wall time of the first
and of a repeated causal call at `--lengths` prompt lengths drawn from 256..1024 that no other backend
sees first (batch 1: a prefill step's attention runs one call per prompt length), the same for one
masked call (a 300-token chunk over a 777-token cached prefix), and the steady time of a causal call
at equal prompts [8, 32, 1024, 128] (CUDA events, median of --iters). Writes sdpa_backends_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import add_run_args, command_line, cuda_missing, default_tag, time_cuda, write_results

HEADS, HEAD_DIM = 32, 128


def backends() -> dict[str, list | None]:
    from models.engine.attention import SHAPE_STABLE_BACKENDS
    return {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION], "engine": SHAPE_STABLE_BACKENDS}


def call(chosen: list | None, q, k, v, **kwargs):
    if chosen is None:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(chosen):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def wall_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def qkv(batch: int, q_len: int, kv_len: int) -> tuple:
    dev = torch.device("cuda")
    q = torch.randn(batch, HEADS, q_len, HEAD_DIM, dtype=torch.float16, device=dev)
    return (q, *(torch.randn(batch, HEADS, kv_len, HEAD_DIM, dtype=torch.float16, device=dev) for _ in range(2)))


def run_backend(name: str, chosen: list | None, lengths: list[int], masked: tuple[int, int], iters: int) -> dict:
    """First and repeated call at each new length, one new masked shape, steady equal-prompt time."""
    first, again = [], []
    for n in lengths:
        q, k, v = qkv(1, n, n)
        first.append(wall_ms(lambda: call(chosen, q, k, v, is_causal=True)))
        again.append(wall_ms(lambda: call(chosen, q, k, v, is_causal=True)))
    t, ctx = masked
    q, k, v = qkv(1, t, ctx)
    mask = torch.ones(t, ctx, dtype=torch.bool, device=q.device).tril(ctx - t)[None, None]
    try:
        masked_ms = (wall_ms(lambda: call(chosen, q, k, v, attn_mask=mask)),
                     wall_ms(lambda: call(chosen, q, k, v, attn_mask=mask)))
    except RuntimeError:  # no kernel of this backend takes an arbitrary mask (flash)
        masked_ms = (None, None)
    q, k, v = qkv(8, 1024, 1024)
    steady = time_cuda(lambda: call(chosen, q, k, v, is_causal=True), iters=iters)["median_us"]
    return {"backend": name, "lengths": lengths, "first_ms": first, "again_ms": again,
            "first_ms_median": statistics.median(first), "first_ms_max": max(first),
            "again_ms_median": statistics.median(again), "masked_shape": list(masked),
            "masked_first_ms": masked_ms[0], "masked_again_ms": masked_ms[1], "equal_prompts_us": steady}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sdpa_backends", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, default=12, help="new prompt lengths per backend")
    p.add_argument("--seed", type=int, default=0)
    add_run_args(p, iters=20)
    args = p.parse_args(argv)
    if cuda_missing("bench.sdpa_backends"):
        return 2
    chosen = backends()
    # every backend gets lengths and a masked shape nobody timed before it (plans are cached per shape)
    pool = random.Random(args.seed).sample(range(256, 1025), args.lengths * len(chosen))
    rows = []
    with torch.no_grad():
        for i, (name, b) in enumerate(chosen.items()):
            lengths = pool[i * args.lengths:(i + 1) * args.lengths]
            rows.append(run_backend(name, b, lengths, (300 + i, 777 + i), args.iters))

    def ms(x):
        return "-" if x is None else f"{x:.2f}"
    table = [{"backend": r["backend"], "new length, first call ms (median / max)":
              f"{r['first_ms_median']:.2f} / {r['first_ms_max']:.1f}", "repeat ms": f"{r['again_ms_median']:.2f}",
              "masked first / repeat ms": f"{ms(r['masked_first_ms'])} / {ms(r['masked_again_ms'])}",
              "[8, 32, 1024, 128] us": f"{r['equal_prompts_us']:.0f}"} for r in rows]
    write_results(args.out, f"sdpa_backends_{args.tag or default_tag()}", "sdpa_backends", rows, table,
                  list(table[0]), command_line("bench.sdpa_backends", argv), device="cuda")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
