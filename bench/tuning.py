"""Tuned vs default W4A4 dispatch: the tuning table's choice against the generator's untuned one.

    python -m bench.tuning [--table tuning/tables/<gpu>.json] [--models llama-7b llama-3-8b]
                           [--m 1 16 64 256 1024 4096] [--iters 20] [--eager] [--out bench/results] [--tag h100]

For every linear shape of each model and every M: "tuned" is the table's (kernel, split_k) for
(M, N, K) (``tuning.table.lookup``; the table's generic rules for a shape it has not tuned) and
"default" is the generator's built-in dispatch choice (``generator.dispatch.default_dispatch``).
Both are forced by name, so the build must contain both (the candidate build the study ran on
does; a build regenerated with --tuning may lack the default kernels: those rows say so). Same
measurement as the tuner (``tuning.objective``): output checked against the reference, CUDA
events, warm-up, L2 flushed before every call, median of --iters, CUDA-graph replays unless
--eager. When both choices are the same kernel and split, it is timed once (ratio 1).
Writes tuning_<tag>.json (bench/common.py schema, impl "tuned" / "default"), .txt and .png
(speedup default/tuned vs M, geometric mean over layers per model), and prints the geometric
mean gain.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from bench.common import L2Flusher, add_run_args, command_line, finish_m_plot, new_figure, write_results

DEFAULT_MODELS = ("llama-7b", "llama-3-8b")
DEFAULT_M = (1, 16, 64, 256, 1024, 4096)


def geomean(xs) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def measure_case(m, n, k, group, choices, iters, graph, flush) -> dict:
    """{impl: timing dict or {'error': ...}} for the tuned and default choices of one case."""
    from generator.manifest import DEFAULT_OUTLIERS, outliers_for
    from tuning.objective import CandidateRejected, CudaObjective, GemmProblem
    from tuning.space import Candidate

    problem = GemmProblem(m, n, k, group, outliers_for(k, group, DEFAULT_OUTLIERS))
    objective = CudaObjective(problem, iters=iters, graph=graph, flush=flush)
    done: dict[Candidate, dict] = {}
    out = {}
    for impl, c in choices.items():
        cand = Candidate(c.kernel, c.split_k)
        if cand not in done:
            try:
                done[cand] = objective.measure(cand)
            except CandidateRejected as e:
                done[cand] = {"error": str(e)}
        out[impl] = {"kernel": c.kernel, "split_k": c.split_k, **done[cand]}
    del problem
    return out


def plot(table_rows, path: Path, gpu: str):
    figure = new_figure()
    if figure is None:
        return None
    fig, ax = figure
    for model in sorted({r["model"] for r in table_rows}):
        ms = sorted({r["M"] for r in table_rows if r["model"] == model})
        pts = [(m, geomean(r["speedup_f"] for r in table_rows if r["model"] == model and r["M"] == m)) for m in ms]
        pts = [(m, g) for m, g in pts if g]
        if not pts:
            continue
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                          label=f"{model} (geomean over layers; dots: layers)")
        layer_pts = [(r["M"], r["speedup_f"]) for r in table_rows if r["model"] == model and r["speedup_f"]]
        ax.scatter([p[0] for p in layer_pts], [p[1] for p in layer_pts], s=12, alpha=0.4, color=line.get_color())
    ax.axhline(1.0, color="gray", lw=0.8)
    return finish_m_plot(fig, ax, path, "speedup of the tuned dispatch over the default",
                         f"W4A4 GEMM: tuned vs default dispatch on {gpu}", legend_size=8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tuning", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=None, help="tuning table (default tuning/tables/<gpu>.json)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="presets or HF config.json paths")
    p.add_argument("--m", nargs="+", type=int, default=list(DEFAULT_M), help="token counts M")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    add_run_args(p)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.tuning needs a CUDA GPU (and atom_ops._C built with the tuned and default kernels)",
              file=sys.stderr)
        return 2
    from atom_ops import kernels
    from generator.configs import ConfigError
    from tuning.gpu import detect_gpu
    from tuning.shapes import model_config
    from tuning.space import default_choice
    from tuning.table import lookup, read_table, table_path

    if not kernels.available():
        print("bench.tuning needs atom_ops._C (build it first: tuning/README.md)", file=sys.stderr)
        return 2
    gpu = detect_gpu()
    path = args.table or table_path(gpu.slug)
    try:
        table = read_table(path)
    except ConfigError as e:
        print(f"error: {e} (run `python -m tuning --model ...` first)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    flush = L2Flusher()
    timing = "eager" if args.eager else "cuda_graph"
    rows, trows = [], []
    for model in args.models:
        for layer, (n, k) in model_config(model).linear_shapes().items():
            tuned_shape = lookup(table, gpu.arch, 1, n, k, generic=False) is not None
            for m in args.m:
                choices = {"tuned": lookup(table, gpu.arch, m, n, k), "default": default_choice(gpu.arch, m)}
                if choices["tuned"] is None:
                    print(f"error: the table has no rules for {gpu.arch}", file=sys.stderr)
                    return 2
                res = measure_case(m, n, k, args.group, choices, args.iters, not args.eager, flush)
                case = {"model": model, "layer": layer, "M": m, "N": n, "K": k, "timing": timing,
                        "tuned_shape": tuned_shape}
                for impl, r in res.items():
                    row = {"case": case, "impl": impl, **r}
                    if "median_us" in r:
                        row["tops"] = 2 * m * n * k / (r["median_us"] * 1e-6) / 1e12
                    rows.append(row)
                t, d = res["tuned"].get("median_us"), res["default"].get("median_us")
                speedup = d / t if t and d else None
                trows.append({"model": model, "layer": layer, "M": m, "N": n, "K": k,
                              "default_us": f"{d:.1f}" if d else "-", "tuned_us": f"{t:.1f}" if t else "-",
                              "speedup": f"{speedup:.2f}x" if speedup else "-", "speedup_f": speedup,
                              "tuned": res["tuned"]["kernel"].removeprefix("atom_w4a4_")
                              + (f" sk{res['tuned']['split_k']}" if res["tuned"]["split_k"] > 1 else ""),
                              "note": "; ".join(r["error"][:60] for r in res.values() if "error" in r)})
                print(f"{model} {layer} M={m}: default {trows[-1]['default_us']} us, tuned {trows[-1]['tuned_us']} us "
                      f"({trows[-1]['speedup']})", flush=True)
    overall = geomean(r["speedup_f"] for r in trows)
    per_model = {mo: geomean(r["speedup_f"] for r in trows if r["model"] == mo) for mo in args.models}
    worst_default = sorted((r for r in trows if r["speedup_f"]), key=lambda r: -r["speedup_f"])[:5]
    summary = [f"geometric-mean speedup tuned/default: {overall:.3f}x" if overall else "no case measured"]
    summary += [f"  {mo}: {g:.3f}x" for mo, g in per_model.items() if g]
    summary += [f"  largest gain: {r['model']} {r['layer']} M={r['M']}: {r['speedup']}" for r in worst_default[:3]]
    write_results(args.out, f"tuning_{args.tag or gpu.slug}", "tuning", rows, trows,
                  ["model", "layer", "M", "N", "K", "default_us", "tuned_us", "speedup", "tuned", "note"],
                  command_line("bench.tuning"), plot=lambda p: plot(trows, p, gpu.name), footer="\n".join(summary),
                  table=str(path), geomean_speedup=overall, geomean_speedup_per_model=per_model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
