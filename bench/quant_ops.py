"""Fused activation quantization vs the unfused torch sequence and vs the copy bandwidth.

    python -m bench.quant_ops [--models llama-7b llama-3-8b] [--m 1 16 256 4096] [--graph] [--out bench/results]

For every model: the RMSNorm + reorder + quantize in front of qkv / gate_up (K = hidden) and the
SiLU(gate) * up + reorder + quantize in front of down_proj (K = intermediate), fp16 input,
group 128 and the outlier rule. "fused" is atom_ops' CUDA kernel (packed output) as the serving
engine runs it: RMSNorm rows gather their permuted channels in the kernel; SiLU rows come with
down_proj's permutation already applied, because the engine stores gate_up's output rows in that
order (models/engine/fused_layers.py), so the kernel gets no permutation. "fused_gather" times the
SiLU kernel with the permutation applied in the kernel instead (a model that does not reorder
gate_up). "fused+staged" also writes the sm90a wgmma family's staged operand, "torch" is the
reference sequence run on the GPU (what the model does without the kernel), "copy" is a
device-to-device copy of the same number of bytes the fused kernel moves (read x, write the packed
operand). Reported: median us (CUDA events, L2 flushed), achieved GB/s of the fused kernel and its
fraction of the copy's GB/s. Writes quant_ops_<tag>.{json,txt,png}.
"""

from __future__ import annotations

import argparse
import sys

import torch

from atom_ops import formats, kernels, quant_ops, staging
from bench.common import L2Flusher, add_run_args, command_line, default_tag, gpu_name, series_plot, time_cuda, write_results


def cases(models):
    from models.config import LlamaConfig, preset
    for name in models:
        cfg = LlamaConfig.from_json(name) if name.endswith(".json") else preset(name)
        yield name, "rmsnorm", cfg.hidden_size
        yield name, "silu_mul", cfg.intermediate_size


def bench_one(m, k, prologue, iters, flush, graph):
    spec = formats.QuantSpec(k, 128, formats.choose_outliers(k, 128, 128))
    cols = 2 * k if prologue == "silu_mul" else k
    x = torch.randn(m, cols, device="cuda", dtype=torch.float16)
    perm = torch.randperm(k, device="cuda")
    perm32 = perm.to(torch.int32)
    weight = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
    in_kernel = None if prologue == "silu_mul" else perm32  # the engine's way (module doc)
    out = {}
    out["fused"] = time_cuda(lambda: kernels.quantize_rows(x, spec, in_kernel, 0.9, prologue, weight), iters,
                             flush=flush, graph=graph)
    if prologue == "silu_mul":
        out["fused_gather"] = time_cuda(lambda: kernels.quantize_rows(x, spec, perm32, 0.9, prologue, weight), iters,
                                        flush=flush, graph=graph)
    out["fused+staged"] = time_cuda(lambda: kernels.quantize_rows(x, spec, in_kernel, 0.9, prologue, weight, staged=True),
                                    iters, flush=flush, graph=graph)
    out["torch"] = time_cuda(lambda: formats.quantize_activation(
        quant_ops.prologue_reference(x, prologue, weight, 1e-5), spec, perm, 0.9), iters, flush=flush, graph=graph)
    moved = x.numel() * 2 + m * (spec.k_normal // 2 + spec.outliers + 2 * spec.scale_columns)
    src = torch.empty(moved // 2, device="cuda", dtype=torch.int16)
    dst = torch.empty_like(src)
    out["copy"] = time_cuda(lambda: dst.copy_(src), iters, flush=flush, graph=graph)
    staged_bytes = moved + m * (staging.staged_k(spec) + 4 * staging.staged_blocks(spec))
    return spec, moved, staged_bytes, out


def plot(rows, path):
    series = {}
    for r in rows:
        series.setdefault((f"{r['model']} {r['prologue']}", f"K={r['K']}"), []).append((r["M"], r["fused_vs_copy"]))
    return series_plot(path, series, "fused kernel GB/s / copy GB/s", f"Fused quantize on {gpu_name()}",
                       reference=0.7)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-7b", "llama-3-8b"])
    p.add_argument("--m", nargs="+", type=int, default=[1, 16, 256, 4096])
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays")
    add_run_args(p)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not kernels.available():
        print("bench.quant_ops needs a CUDA GPU and the compiled extension", file=sys.stderr)
        return 2
    flush = L2Flusher()
    rows = []
    for model, prologue, k in cases(args.models):
        for m in args.m:
            spec, moved, staged_bytes, res = bench_one(m, k, prologue, args.iters, flush, args.graph)
            f, c = res["fused"]["median_us"], res["copy"]["median_us"]
            row = {"model": model, "prologue": prologue, "M": m, "K": k, "outliers": spec.outliers,
                   "bytes": moved, **{f"{n}_us": round(r["median_us"], 2) for n, r in res.items()},
                   "fused_GBps": round(moved / f / 1e3, 1), "copy_GBps": round(moved / c / 1e3, 1),
                   "fused_vs_copy": round(c / f, 3), "fused_vs_torch": round(res["torch"]["median_us"] / f, 2),
                   "staged_GBps": round(staged_bytes / res["fused+staged"]["median_us"] / 1e3, 1)}
            if "fused_gather" in res:
                row["gather_vs_copy"] = round(c / res["fused_gather"]["median_us"], 3)
            rows.append(row)
            print(f"{model} {prologue} M={m} K={k}: fused {f:.1f} us ({row['fused_GBps']} GB/s, "
                  f"{row['fused_vs_copy']:.2f} of copy), torch {res['torch']['median_us']:.1f} us", flush=True)
    cols = ["model", "prologue", "M", "K", "fused_us", "fused_gather_us", "fused+staged_us", "torch_us", "copy_us",
            "fused_GBps", "copy_GBps", "fused_vs_copy", "gather_vs_copy", "fused_vs_torch", "staged_GBps"]
    write_results(args.out, f"quant_ops_{args.tag or default_tag()}", "quant_ops", rows, rows, cols,
                  command_line("bench.quant_ops", argv), plot=lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
