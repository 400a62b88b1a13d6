"""KV4 prefill attention: the fused kernel against the engine's unfused path, in one run.

    python -m bench.kv4_prefill [--cases llama-3-8b:1:1024:0 llama-7b:4:512:1536 ...] [--iters 20] [--out bench/results]

Each case is layout:batch:new:prefix (layouts as bench.attention): `new` query tokens per row that
see a cached prefix of `prefix` tokens plus themselves (causal), over shuffled KV4 pages. Timed
(CUDA-graph replays, L2 flushed, median of --iters):
  kernel   atom_ops.kv4_prefill_attention (dequantizes the pages in registers)
  gather   kv4_gather (pages -> contiguous fp16 K, V) + torch SDPA with a causal mask, the engine's
           path without ATOM_KV4_PREFILL=kernel (the same calls as models/engine/attention.py)
  sdpa16   torch SDPA over an fp16 cache already contiguous (no gather, no KV4): the fp16 engine's
           best case, for orientation
Reported: each time, kernel_vs_gather = gather / kernel (> 1: the kernel is faster), kernel_vs_sdpa16,
and the kernel's max |diff| against gather + SDPA. Writes kv4_prefill_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from atom_ops import attention as attention_ops
from bench.attention import LAYOUTS, make_case
from bench.common import L2Flusher, add_run_args, command_line, cuda_missing, default_tag, time_cuda, write_results

DEFAULT_CASES = ["llama-3-8b:1:1024:0", "llama-3-8b:1:4096:0", "llama-3-8b:4:1024:0", "llama-3-8b:16:512:512",
                 "llama-3-8b:4:512:3584", "llama-7b:1:1024:0", "llama-7b:4:1024:0", "llama-7b:8:256:1792",
                 "llama-7b:16:1024:0"]


def parse_case(text: str) -> tuple[str, int, int, int]:
    try:
        layout, batch, new, prefix = text.split(":")
        if layout not in LAYOUTS:
            raise ValueError
        return layout, int(batch), int(new), int(prefix)
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r} is not layout:batch:new:prefix "
                                         f"(layouts: {', '.join(LAYOUTS)})") from None


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
    """q [B, Hq, T, D] at positions context - T .. context - 1 over k, v [B, Hkv, >= context, D]."""
    B, hq, T, d = q.shape
    hkv = k.shape[1]
    k, v = k[:, :, :context], v[:, :, :context]
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    if T == context:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5)
    q_pos = context - T + torch.arange(T, device=q.device)
    visible = torch.arange(context, device=q.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=d ** -0.5)


def bench_case(layout: str, batch: int, new: int, prefix: int, iters: int, flush) -> dict:
    context = new + prefix
    _, (kp, vp), tables, lens, k16, v16 = make_case(layout, batch, context, "cuda")
    hq, _, d = LAYOUTS[layout]
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(batch, hq, new, d, generator=g, device="cuda").half()

    def kernel():
        return attention_ops.kv4_prefill_attention(q, kp, vp, tables, lens)

    def gather():
        k, v = attention_ops.kv4_gather(kp, vp, tables, q.dtype)
        return causal_sdpa(q, k, v, context)

    k16, v16 = k16.contiguous(), v16.contiguous()
    diff = (kernel().float() - gather().float()).abs().max().item()
    times = {name: round(time_cuda(fn, iters, flush=flush, graph=True)["median_us"], 2)
             for name, fn in (("kernel", kernel), ("gather", gather),
                              ("sdpa16", lambda: causal_sdpa(q, k16, v16, context)))}
    return {"layout": layout, "batch": batch, "new": new, "prefix": prefix, "kernel_us": times["kernel"],
            "gather_us": times["gather"], "sdpa16_us": times["sdpa16"],
            "kernel_vs_gather": round(times["gather"] / times["kernel"], 3),
            "kernel_vs_sdpa16": round(times["sdpa16"] / times["kernel"], 3), "max_diff": round(diff, 5)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv4_prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES])
    add_run_args(p)
    args = p.parse_args(argv)
    if cuda_missing("bench.kv4_prefill"):
        return 2
    flush = L2Flusher()
    rows = []
    for case in args.cases:
        row = bench_case(*case, args.iters, flush)
        print(row, flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    cols = ["layout", "batch", "new", "prefix", "kernel_us", "gather_us", "sdpa16_us", "kernel_vs_gather",
            "kernel_vs_sdpa16", "max_diff"]
    write_results(args.out, f"kv4_prefill_{args.tag or default_tag()}", "kv4_prefill", rows, rows, cols,
                  command_line("bench.kv4_prefill", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
