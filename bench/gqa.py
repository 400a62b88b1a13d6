"""GQA attention: repeating K and V per query head then SDPA (the old path) against SDPA's enable_gqa.

    python -m bench.gqa [--iters 50] [--device cuda] [--out bench/results] [--tag h100]

Causal self-attention, head_dim 128, fp16, Llama-3-8B's heads (32 query heads over 8 kv heads) at
three prefill shapes, and a 32-over-32 (MHA) row where the "repeat" is a plain copy. Per case: GPU
us of each path (CUDA events, median; on the CPU wall time of the reference backend, a smoke test)
and whether the two outputs are equal bit for bit (they are: enable_gqa reads each kv head for its
query heads instead of copying it). Writes gqa_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import add_run_args, command_line, default_tag, write_results

# (batch, query tokens, query heads, kv heads)
CASES = ((8, 1024, 32, 8), (1, 8192, 32, 8), (64, 128, 32, 8), (8, 1024, 32, 32))


def median_us(fn, iters: int, dev: torch.device) -> float:
    fn()
    if dev.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e6 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize(dev)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for s, e in pairs:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(dev)
    return statistics.median(1e3 * s.elapsed_time(e) for s, e in pairs)


def run_case(batch: int, tokens: int, q_heads: int, kv_heads: int, dev: torch.device, iters: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, q_heads, tokens, 128, generator=g).to(dev, torch.float16)
    k, v = (torch.randn(batch, kv_heads, tokens, 128, generator=g).to(dev, torch.float16) for _ in range(2))
    r = q_heads // kv_heads

    def repeated():
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True)

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    rep_us, gqa_us = median_us(repeated, iters, dev), median_us(gqa, iters, dev)
    return {"batch": batch, "tokens": tokens, "q_heads": q_heads, "kv_heads": kv_heads, "repeat_us": rep_us,
            "gqa_us": gqa_us, "speedup": rep_us / gqa_us, "bit_exact": bool(torch.equal(repeated(), gqa()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gqa", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", type=int, default=len(CASES), help="run the first N cases (smoke tests: 1)")
    add_run_args(p, iters=50)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    with torch.no_grad():
        rows = [run_case(*c, dev, args.iters) for c in CASES[:args.cases]]
    table = [{"shape": f"B{r['batch']} T{r['tokens']} Hq{r['q_heads']} Hkv{r['kv_heads']}",
              "repeat + SDPA us": f"{r['repeat_us']:.1f}", "enable_gqa us": f"{r['gqa_us']:.1f}",
              "speedup": f"{r['speedup']:.2f}x", "bit-exact": str(r["bit_exact"])} for r in rows]
    write_results(args.out, f"gqa_{args.tag or default_tag()}", "gqa", rows, table,
                  ["shape", "repeat + SDPA us", "enable_gqa us", "speedup", "bit-exact"],
                  command_line("bench.gqa", argv), device=str(dev))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
