"""The fp16 / fp8 serving baselines' fused elementwise kernels against the torch ops they replace.

    python -m bench.baseline_ops [--models llama-7b llama-3-8b] [--m 64 8192] [--graph] [--out bench/results]

The engine gives its fp16 and fp8 modes what a serving stack runs (models/engine/fused_layers.py),
so that atom's ratios are not inflated by slow baselines. Per model and token count M, fp16 input:
  rmsnorm     the model's HF-order RMSNorm (models/llama.py; fp32 cast, pow, mean, rsqrt, two
              multiplies, cast back) against torch's fused F.rms_norm, K = hidden size
  silu_mul    F.silu(gate) * up against atom_ops.kernels.silu_mul (same bits), K = intermediate size
  fp8_silu    that product then the per-token e4m3 quantization (kernels.fp8_quantize_rows) against
              the one fused kernel fp8_quantize_rows(gate_up, silu_mul=True) (same bits)
Reported: median us of both (CUDA events, L2 flushed) and torch / fused. Writes
baseline_ops_<tag>.{json,txt,png}.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from atom_ops import kernels
from bench.common import L2Flusher, add_run_args, command_line, default_tag, gpu_name, series_plot, time_cuda, write_results

OPS = ("rmsnorm", "silu_mul", "fp8_silu")


def cases(models):
    """(model, op, K) for every op: K is the width of the op's output row."""
    from models.config import LlamaConfig, preset
    for name in models:
        cfg = LlamaConfig.from_json(name) if name.endswith(".json") else preset(name)
        yield name, "rmsnorm", cfg.hidden_size
        yield name, "silu_mul", cfg.intermediate_size
        yield name, "fp8_silu", cfg.intermediate_size


def op_pair(op: str, m: int, k: int):
    """(torch_fn, fused_fn) of one case, over fresh fp16 inputs on the GPU."""
    from models.llama import RMSNorm

    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if op == "rmsnorm":
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        norm = RMSNorm(k).to("cuda", torch.float16)
        return (lambda: norm(x)), (lambda: F.rms_norm(x, (k,), norm.weight, norm.eps))
    gate_up = torch.randn(m, 2 * k, device="cuda", dtype=torch.float16)
    gate, up = gate_up.chunk(2, dim=-1)
    if op == "silu_mul":
        return (lambda: F.silu(gate) * up), (lambda: kernels.silu_mul(gate_up))
    return (lambda: kernels.fp8_quantize_rows(F.silu(gate) * up)), (lambda: kernels.fp8_quantize_rows(gate_up, silu_mul=True))


def plot(rows, path):
    series = {}
    for r in rows:
        series.setdefault((r["op"], f"{r['model']} K={r['K']}"), []).append((r["M"], r["fused_vs_torch"]))
    return series_plot(path, series, "torch ops time / fused kernel time", f"Baselines' fused kernels on {gpu_name()}",
                       reference=1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-7b", "llama-3-8b"])
    p.add_argument("--m", nargs="+", type=int, default=[64, 8192])
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays")
    add_run_args(p)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not hasattr(kernels.extension(), "silu_mul"):
        print("bench.baseline_ops needs a CUDA GPU and the compiled extension (with silu_mul)", file=sys.stderr)
        return 2
    flush = L2Flusher()
    rows = []
    for model, op, k in cases(args.models):
        for m in args.m:
            torch_fn, fused_fn = op_pair(op, m, k)
            t = time_cuda(torch_fn, args.iters, flush=flush, graph=args.graph)["median_us"]
            f = time_cuda(fused_fn, args.iters, flush=flush, graph=args.graph)["median_us"]
            rows.append({"model": model, "op": op, "M": m, "K": k, "torch_us": round(t, 2), "fused_us": round(f, 2),
                         "fused_vs_torch": round(t / f, 2)})
            print(f"{model} {op} M={m} K={k}: torch {t:.1f} us, fused {f:.1f} us ({t / f:.2f}x)", flush=True)
    write_results(args.out, f"baseline_ops_{args.tag or default_tag()}", "baseline_ops", rows, rows,
                  ["model", "op", "M", "K", "torch_us", "fused_us", "fused_vs_torch"],
                  command_line("bench.baseline_ops", argv), plot=lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
