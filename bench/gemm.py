"""W4A4 GEMM benchmark: our kernels vs torch fp16, torch FP8 ``_scaled_mm`` (rowwise),
``torch._int_mm``, torch's W4A16 ``_weight_int4pack_mm`` (g128) and ``cutlass_int8`` (the plain
CUTLASS INT8 GEMM of our generator's int8 family, no groups: the ceiling our groups cost
against), side by side in one process on the same shapes.

    python -m bench.gemm [--models llama-7b llama-3-8b smollm2-135m] [--m 1 16 64 256 1024 4096 8192]
                         [--iters 20] [--kernel NAME] [--kernels wgmma|NAME ...] [--graph] [--out bench/results] [--tag h100]

Shapes: every linear of each model (qkv, o, gate_up, down; models.config presets or an HF
config.json), group 128 and the outlier rule of atom_ops.formats.choose_outliers. Activations
are pre-quantized (the GEMM alone is timed). CUDA events, warm-up, L2 flushed before every
call, median of >= 20. Writes gemm_<tag>.json (bench/common.py schema), prints a table and
saves gemm_<tag>.png (speedup over torch fp16 vs M).
On the H100 the INT4 mma of the sm80-style kernels is emulated; the dispatch picks the sm90a
wgmma family (staged operands, atom_ops/staging.py) for group 128. "atom" times the op as a
user calls it (activation staged by a CUDA kernel per call, weight staged once); "atom_kernel"
times the wgmma kernel alone on staged operands. The ratio columns use atom_kernel when present.
``--kernels`` also times each named compiled wgmma kernel (``wgmma``: every runnable one with
fp16 output, e.g. the decode, medium and prefill tiles; split-K ones at each ``--splits``) alone on the same
staged operands, one column per kernel plus the fastest one's ratios (``best_*``), in the same
process as the baselines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from atom_ops import formats, kernels, staging
from bench.common import L2Flusher, add_run_args, command_line, cuda_missing, default_tag, gpu_name, series_plot, time_cuda, write_results

DEFAULT_MODELS = ("llama-7b", "llama-3-8b", "smollm2-135m")
DEFAULT_M = (1, 16, 64, 256, 1024, 4096, 8192)
IMPLS = ("atom", "atom_kernel", "torch_fp16", "torch_fp8", "torch_int_mm", "cutlass_int8", "torch_w4a16")


def model_shapes(name: str):
    from models.config import LlamaConfig, preset
    cfg = LlamaConfig.from_json(name) if name.endswith(".json") else preset(name)
    return list(cfg.linear_shapes().items())


KERNEL_PREFIX = "k:"  # impl name of a kernel timed by --kernels: "k:<kernel name>"


def kernel_label(name: str) -> str:
    """Short column label of a wgmma kernel name (arch, group, outliers, dtype dropped)."""
    return name.replace("atom_w4a4_wgmma_sm90a_", "").replace("_g128_oany_f16", "")


def wgmma_kernels(requested, splits=(1,)) -> list[str]:
    """--kernels: 'wgmma' = every runnable compiled wgmma kernel with fp16 output; else names.
    Kernels built with split-K (_sk) appear once per --splits factor, as "NAME@S"."""
    if requested == ["wgmma"]:
        requested = sorted(k["name"] for k in kernels.runnable_kernels()
                           if k["family"] == "wgmma" and k["out_dtype"] == "f16")
    entries = []
    for name in requested:
        try:
            split_k = kernels.kernel_info(name)["split_k"]
        except formats.FormatError:  # not compiled: its column reports that
            split_k = False
        entries += [f"{name}@{s}" for s in splits] if split_k else [name]
    return entries


def bench_case(m: int, n: int, k: int, impls, iters: int, flush, kernel: str, group: int, graph: bool = False,
               kernel_list=()):
    """{impl: timing dict or {'error': str}} for one (M, N, K)."""
    out = {}
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    w = torch.randn(n, k, device=dev, dtype=torch.float16)
    if "torch_fp16" in impls:
        out["torch_fp16"] = time_cuda(lambda: torch.nn.functional.linear(x, w), iters, flush=flush, graph=graph)
    if "torch_fp8" in impls:
        try:
            f8 = torch.float8_e4m3fn
            xs = (x.abs().amax(dim=1, keepdim=True).float() / 448).clamp_min(1e-8)
            ws = (w.abs().amax(dim=1, keepdim=True).float() / 448).clamp_min(1e-8)
            x8 = (x / xs).to(f8)
            w8 = (w / ws).to(f8)
            wt = w8.t()  # column-major [K, N]
            wst = ws.t().contiguous()
            fn = lambda: torch._scaled_mm(x8, wt, scale_a=xs, scale_b=wst, out_dtype=torch.bfloat16)  # noqa: E731
            fn()
            out["torch_fp8"] = time_cuda(fn, iters, flush=flush, graph=graph)
        except (RuntimeError, TypeError) as e:
            out["torch_fp8"] = {"error": str(e).splitlines()[0][:160]}
    if "torch_int_mm" in impls:
        try:
            xi = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
            wi = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8).t()
            fn = lambda: torch._int_mm(xi, wi)  # noqa: E731
            fn()
            out["torch_int_mm"] = time_cuda(fn, iters, flush=flush, graph=graph)
        except RuntimeError as e:
            out["torch_int_mm"] = {"error": str(e).splitlines()[0][:160]}
    if "cutlass_int8" in impls:
        # Our generator's int8 family: int8 x int8 -> int32, exact, no scales (atom_ops.kernels.int8_gemm).
        try:
            xi = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
            wi = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
            yi = torch.empty((m, n), device=dev, dtype=torch.int32)
            fn = lambda: kernels.int8_gemm(xi, wi, out=yi)  # noqa: E731
            fn()
            r = time_cuda(fn, iters, flush=flush, graph=graph)
            r["kernel"] = kernels.int8_kernel_for(m, n, k)
            out["cutlass_int8"] = r
        except (RuntimeError, formats.FormatError) as e:
            out["cutlass_int8"] = {"error": str(e).splitlines()[0][:160]}
    if "torch_w4a16" in impls:
        # What a torch user picks for 4-bit weights: tinygemm W4A16 (bf16 activations, g128).
        try:
            wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
            err = None
            for tiles in (8, 4, 2):
                try:
                    wp = torch.ops.aten._convert_weight_to_int4pack(wq, tiles)
                    break
                except RuntimeError as e:
                    err = e
            else:
                raise err
            sz = torch.rand(k // group, n, 2, device=dev, dtype=torch.bfloat16)
            xb = x.to(torch.bfloat16)
            fn = lambda: torch.ops.aten._weight_int4pack_mm(xb, wp, group, sz)  # noqa: E731
            fn()
            out["torch_w4a16"] = time_cuda(fn, iters, flush=flush, graph=graph)
        except (RuntimeError, TypeError, AttributeError) as e:
            out["torch_w4a16"] = {"error": str(e).splitlines()[0][:160]}
    if "atom" in impls or "atom_kernel" in impls:  # atom_kernel times the kernel that atom dispatches
        try:
            o = formats.choose_outliers(k, group, 128)
            spec = formats.QuantSpec(k, group, o)
            a = formats.quantize_operand(x.float(), spec, clip=0.9)
            wq = formats.quantize_operand(w.float(), spec, clip=0.85)
            fn = lambda: kernels.w4a4_gemm(a, wq, torch.float16, None, kernel=kernel)  # noqa: E731
            if fn() is None:
                raise RuntimeError("no compiled kernel for this GPU")
            r = time_cuda(fn, iters, flush=flush, graph=graph)
            # what the op ran (the forced kernel, else the tuning table's choice or the dispatch)
            r["kernel"], r["split_k"] = ((kernel, 0) if kernel else kernels.dispatched_kernel(a, wq, torch.float16))
            if "atom" in impls:
                out["atom"] = r
            if kernels.kernel_family(r["kernel"]) == "wgmma" and "atom_kernel" in impls:
                # The Hopper family alone on pre-staged operands (what a fused quantize kernel
                # feeds it); "atom" above also stages the activation (one CUDA kernel) per call.
                sa, sw = staging.stage_operand(a), kernels.staged_weight(wq)
                y = torch.empty((m, n), device=dev, dtype=torch.float16)
                fk = lambda: kernels.staged_gemm(sa, sw, torch.float16, None, r["kernel"], y)  # noqa: E731
                fk()
                rk = time_cuda(fk, iters, flush=flush, graph=graph)
                rk["kernel"] = r["kernel"]
                out["atom_kernel"] = rk
        except (RuntimeError, formats.FormatError) as e:
            out["atom" if "atom" in impls else "atom_kernel"] = {"error": str(e).splitlines()[0][:160]}
    if kernel_list:
        # Each listed wgmma kernel alone on the same pre-staged operands (tiles, schedules):
        # what atom_kernel times for the dispatched one.
        o = formats.choose_outliers(k, group, 128)
        spec = formats.QuantSpec(k, group, o)
        sa = staging.stage_operand(formats.quantize_operand(x.float(), spec, clip=0.9))
        sw = kernels.staged_weight(formats.quantize_operand(w.float(), spec, clip=0.85))
        y = torch.empty((m, n), device=dev, dtype=torch.float16)
        for entry in kernel_list:
            name, _, split = entry.partition("@")
            try:
                fk = lambda name=name, split=int(split or 1): kernels.staged_gemm(  # noqa: E731
                    sa, sw, torch.float16, None, name, y, split_k=split)
                fk()
                r = time_cuda(fk, iters, flush=flush, graph=graph)
                r["kernel"] = name
                r["split_k"] = int(split or 1)
                out[KERNEL_PREFIX + entry] = r
            except (RuntimeError, formats.FormatError) as e:
                out[KERNEL_PREFIX + entry] = {"error": str(e).splitlines()[0][:160]}
    return out


def plot(rows, path: Path, gpu: str | None = None):
    """Speedup over torch fp16 vs M: one colour per implementation, one line style per model.
    Redraw from a saved JSON: plot(json.load(f)["rows"], path, gpu=json["gpu"])."""
    base = {}
    for r in rows:
        if r["impl"] == "torch_fp16":
            c = r["case"]
            base[(c["model"], c["layer"], c["M"])] = r["median_us"]
    series = {}
    for r in rows:
        if r["impl"] == "torch_fp16" or "median_us" not in r:
            continue
        c = r["case"]
        b = base.get((c["model"], c["layer"], c["M"]))
        if b:
            series.setdefault((r["impl"], c["model"]), {}).setdefault(c["M"], []).append(b / r["median_us"])
    geomeans = {key: [(m, torch.tensor(v).log().mean().exp().item()) for m, v in pts.items()]
                for key, pts in series.items()}
    return series_plot(path, geomeans, "speedup over torch fp16 (geomean over layers)",
                       f"W4A4 GEMM vs baselines on {gpu or gpu_name()}", reference=1.0, ncol=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="presets or HF config.json paths")
    p.add_argument("--m", nargs="+", type=int, default=list(DEFAULT_M), help="token counts M")
    p.add_argument("--layers", nargs="+", default=None, help="only these layers (qkv o gate_up down)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--kernel", default="", help="force one compiled kernel by name (default: dispatch)")
    p.add_argument("--kernels", nargs="+", default=[],
                   help="also time these compiled wgmma kernels alone on staged operands ('wgmma': all runnable, f16)")
    p.add_argument("--splits", nargs="+", type=int, default=[2, 4],
                   help="split-K factors for the --kernels built with split-K (_sk)")
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays (no host/launch overhead) instead of eager calls")
    add_run_args(p)
    args = p.parse_args(argv)
    if cuda_missing("bench.gemm"):
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    flush = L2Flusher()
    klist = wgmma_kernels(args.kernels, args.splits) if args.kernels else []
    if args.kernels and not klist:
        print("bench.gemm --kernels: no runnable compiled wgmma kernel", file=sys.stderr)
        return 2
    rows, table = [], []
    for model in args.models:
        for layer, (n, k) in model_shapes(model):
            if args.layers and layer not in args.layers:
                continue
            for m in args.m:
                res = bench_case(m, n, k, args.impls, args.iters, flush, args.kernel, args.group, args.graph, klist)
                case = {"model": model, "layer": layer, "M": m, "N": n, "K": k,
                        "timing": "cuda_graph" if args.graph else "eager"}
                trow = {"model": model, "layer": layer, "M": m, "N": n, "K": k}
                for impl, r in res.items():
                    row = {"case": case, "impl": impl, **r}
                    col = kernel_label(impl[len(KERNEL_PREFIX):]) if impl.startswith(KERNEL_PREFIX) else impl
                    if "median_us" in r:
                        row["tops"] = 2 * m * n * k / (r["median_us"] * 1e-6) / 1e12
                        trow[col + "_us"] = f"{r['median_us']:.1f}"
                    else:
                        trow[col + "_us"] = "-"
                    rows.append(row)
                # Ratios of our fastest path (the kernel on staged operands where it exists).
                at = res.get("atom_kernel", res.get("atom", {})).get("median_us")
                for base, col in (("torch_fp16", "atom_vs_fp16"), ("torch_fp8", "atom_vs_fp8"),
                                  ("cutlass_int8", "atom_vs_int8")):
                    b = res.get(base, {}).get("median_us")
                    trow[col] = f"{b / at:.2f}x" if b and at else "-"
                if klist:  # the fastest listed kernel and its ratios
                    timed = [(r["median_us"], i[len(KERNEL_PREFIX):]) for i, r in res.items()
                             if i.startswith(KERNEL_PREFIX) and "median_us" in r]
                    if timed:
                        best_us, best = min(timed)
                        trow["best_kernel"] = kernel_label(best)
                        for base, col in (("torch_fp16", "best_vs_fp16"), ("torch_fp8", "best_vs_fp8")):
                            b = res.get(base, {}).get("median_us")
                            trow[col] = f"{b / best_us:.2f}x" if b else "-"
                table.append(trow)
                print(f"{model} {layer} M={m}: " + ", ".join(
                    f"{i}={r['median_us']:.1f}" if "median_us" in r else f"{i}=-" for i, r in res.items()), flush=True)
    cols = (["model", "layer", "M", "N", "K"] + [i + "_us" for i in args.impls]
            + ["atom_vs_fp16", "atom_vs_fp8", "atom_vs_int8"])
    if klist:
        cols += [kernel_label(nm) + "_us" for nm in klist] + ["best_kernel", "best_vs_fp16", "best_vs_fp8"]
    write_results(args.out, f"gemm_{args.tag or default_tag()}", "gemm", rows, table, cols, command_line("bench.gemm"),
                  plot=lambda path: plot(rows, path), kernels=kernels.kernel_names(),
                  int8_kernels=[k["name"] for k in kernels.int8_kernels_info()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
