"""KV4 decode attention at every forced split count: the data behind atom_ops.attention.decode_splits.

    python -m bench.kv4_splits [--cases llama-3-8b:64:2048 llama-7b:64:4096 ...] [--iters 20] [--out bench/results]

Each case (layout:batch:context, layouts as bench.attention) times kv4_decode_attention with
splits = 1, 2, 3, 4, 5, 6, 8, 12, 16 (those that fit the context's 128-token tiles) and with the
split rule's own choice, over the same KV4 pages (bench.attention.make_case; CUDA-graph replays,
L2 flushed, median of --iters). Reported per case: the rule's split count and time, the best
forced count and time, and rule / best (1.00 = the rule picked the best). Writes
kv4_splits_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse

import torch

from atom_ops import attention as attention_ops
from bench.attention import PAGE_SIZE, make_case
from bench.common import L2Flusher, add_run_args, command_line, cuda_missing, default_tag, time_cuda, write_results

DEFAULT_CASES = ["llama-3-8b:16:4096", "llama-3-8b:64:1024", "llama-3-8b:64:2048", "llama-3-8b:64:4096",
                 "llama-3-8b:64:8192", "llama-3-8b:256:2048", "llama-7b:16:4096", "llama-7b:64:2048",
                 "llama-7b:64:4096", "llama-7b:256:1024"]
FORCED = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def parse_case(text: str) -> tuple[str, int, int]:
    try:
        layout, batch, context = text.split(":")
        return layout, int(batch), int(context)
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r} is not layout:batch:context") from None


def bench_case(layout: str, batch: int, context: int, iters: int, flush, sms: int) -> dict:
    q, (kp, vp), tables, lens, _, _ = make_case(layout, batch, context, "cuda")
    kv_heads = kp[0].shape[1]
    rule = attention_ops.decode_splits(batch, kv_heads, tables.shape[1] * PAGE_SIZE, sms)
    tiles = -(-context // attention_ops.KV4_TILE)
    times = {}
    for s in sorted({s for s in FORCED if s <= tiles} | {rule}):
        times[s] = round(time_cuda(lambda s=s: attention_ops.kv4_decode_attention(q, kp, vp, tables, lens, splits=s),
                                   iters, flush=flush, graph=True)["median_us"], 2)
    best = min(times, key=times.get)
    return {"layout": layout, "batch": batch, "context": context, "pairs": batch * kv_heads, "rule": rule,
            "rule_us": times[rule], "best": best, "best_us": times[best],
            "rule_vs_best": round(times[rule] / times[best], 3), "times_us": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv4_splits", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES])
    add_run_args(p)
    args = p.parse_args(argv)
    if cuda_missing("bench.kv4_splits"):
        return 2
    flush = L2Flusher()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for layout, batch, context in args.cases:
        row = bench_case(layout, batch, context, args.iters, flush, sms)
        print(f"{layout} batch {batch} context {context}: rule {row['rule']} ({row['rule_us']} us), "
              f"best {row['best']} ({row['best_us']} us), all {row['times_us']}", flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    cols = ["layout", "batch", "context", "pairs", "rule", "rule_us", "best", "best_us", "rule_vs_best"]
    write_results(args.out, f"kv4_splits_{args.tag or default_tag()}", "kv4_splits", rows, rows, cols,
                  command_line("bench.kv4_splits", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
