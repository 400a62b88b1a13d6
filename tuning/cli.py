"""Command line: ``python -m tuning --model llama-7b [--trials N] [--time-budget MIN] ...``."""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from generator.cli import normalize_archs
from generator.configs import ARCHS, ConfigError

from .gpu import NoGpuError, detect_gpu, gpu_slug
from .shapes import model_shapes
from .space import DEFAULT_GROUP, TUNE_DTYPE, build_spaces, default_choice
from .table import BucketResult, Choice, merge_table, read_table, shape_rules, table_path, write_table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_M_BUCKETS = (1, 16, 64, 256, 1024, 4096)

EPILOG = """\
workflow (tuning/README.md):
  1. build candidates:  cmake -S . -B build/dev -G Ninja -DATOM_CUDA_ARCHS="80;90a" \\
                          -DATOM_GENERATOR_ARGS="--level;1" && ninja -C build/dev
  2. tune:              python -m tuning --model llama-7b llama-3-8b --trials 40 --time-budget 7
  3. compare:           python -m bench.tuning        (same build: tuned and default forced by name)
  4. compile the table: python -m generator --arch sm90a --tuning tuning/tables/<gpu>.json
                        (or -DATOM_GENERATOR_ARGS="--tuning;tuning/tables/<gpu>.json" and rebuild)
Studies resume from --study-db; inspect them with: optuna-dashboard sqlite:///<study-db>
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tuning", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Tune the W4A4 GEMM dispatch for this GPU with optuna and write "
                                            "the dispatch table that `python -m generator --tuning` compiles in.")
    p.add_argument("--model", nargs="+", required=True, metavar="NAME|config.json|FILE.gguf",
                   help="models whose linear shapes to tune: presets (llama-7b, llama-2-13b, llama-3-8b, "
                        "smollm2-135m), HF config.json files or GGUF files")
    p.add_argument("--arch", default="auto", metavar="ARCH",
                   help=f"generator arch to tune ({', '.join(ARCHS)}); auto = from the GPU's compute capability")
    p.add_argument("--trials", type=int, default=40, metavar="N",
                   help="trials added per study in this run (spaces no larger than N are searched "
                        "exhaustively; default 40)")
    p.add_argument("--time-budget", type=float, default=20.0, metavar="MIN",
                   help="wall-clock budget of the whole run in minutes, checked between trials; studies "
                        "left out are reported and resume on the next run (default 20; 0 = none)")
    p.add_argument("--study-db", type=Path, metavar="PATH",
                   help="optuna SQLite file (default build/tuning/<gpu>.sqlite3); reruns resume its studies")
    p.add_argument("--out", type=Path, metavar="PATH",
                   help="dispatch table to write or update (default tuning/tables/<gpu>.json)")
    p.add_argument("--m-buckets", type=int, nargs="+", default=list(DEFAULT_M_BUCKETS), metavar="M",
                   help="M values to tune at; each is the upper bound of its bucket, the largest covers "
                        f"every larger M (default {' '.join(map(str, DEFAULT_M_BUCKETS))})")
    p.add_argument("--group", type=int, default=DEFAULT_GROUP, help="quantization group measured (default 128)")
    p.add_argument("--also-groups", type=int, nargs="+", default=[], metavar="G",
                   help="only try kernels that also run these groups (default: any kernel that runs --group; "
                        "a call the tuned kernel cannot run falls back to one that can at run time)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per candidate (median; default 20)")
    p.add_argument("--eager", action="store_true",
                   help="time eager calls instead of CUDA-graph replays (includes host launch overhead)")
    p.add_argument("--min-gain", type=float, default=0.02,
                   help="keep the default choice unless the best is this much faster (default 0.02 = 2%%)")
    p.add_argument("--slow-factor", type=float, default=3.0,
                   help="prune a candidate whose first call is this many times slower than the best so far")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--list", action="store_true",
                   help="print the studies and their candidates, run nothing (works without a GPU "
                        "when --arch is given)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error("--trials must be >= 1")
    if args.time_budget < 0:
        p.error("--time-budget must be >= 0")
    if any(m < 1 for m in args.m_buckets):
        p.error("--m-buckets must be >= 1")
    args.m_buckets = sorted(set(args.m_buckets))
    return args


def compiled_kernels(arch: str) -> set[str]:
    """fp16 kernels of ``arch`` in atom_ops._C ({} without the extension)."""
    from atom_ops import kernels
    return {k["name"] for k in kernels.kernels_info() if k["arch"] == arch and k["out_dtype"] == TUNE_DTYPE}


def make_tasks(shapes, arch: str, m_buckets, compiled: set[str], group: int, also_groups=()):
    from .study import StudyTask
    tasks, spaces = [], []
    for s in shapes:
        shape_spaces = build_spaces(arch, s.n, s.k, compiled, group, tuple(also_groups))
        spaces += [(s, space) for space in shape_spaces]
        # families innermost: their studies of one (N, K, M) share one problem (operands, reference)
        tasks += [StudyTask(space, m, default_choice(arch, m), s.layers) for m in m_buckets for space in shape_spaces]
    return tasks, spaces


def print_spaces(spaces, m_buckets) -> None:
    for s, space in spaces:
        print(f"{space.arch}/{space.family} N={space.n} K={space.k} ({', '.join(s.layers)}): "
              f"{len(space.candidates())} candidates from {len(space.compiled)} compiled kernels "
              f"(+{len(space.missing())} configs not compiled), M buckets {m_buckets}")
        for name in space.compiled:
            print(f"    {name}")


def report_missing(spaces, arch: str, models) -> None:
    missing = sorted({k for _, sp in spaces for k in sp.missing()})
    compiled = sorted({k for _, sp in spaces for k in sp.compiled})
    if missing:
        print(f"tuning: {len(compiled)} candidate kernels are compiled for {arch}; {len(missing)} more configs of "
              f"the level-2 manifest run these shapes but are not compiled. To search them too, rebuild with "
              f"-DATOM_GENERATOR_ARGS=\"--level;2;--model;{';--model;'.join(models)}\" (hundreds of kernels) or "
              "\"--level;1\", then rerun (the new space gets new studies).", file=sys.stderr)


def bucket_results(tasks, outcomes) -> dict[tuple[int, int], list[BucketResult]]:
    """Per (N, K): one BucketResult per M, the best over the families' studies."""
    per: dict[tuple[int, int, int], list] = {}
    for task, out in zip(tasks, outcomes):
        per.setdefault((task.space.n, task.space.k, task.m), []).append((task, out))
    results: dict[tuple[int, int], list[BucketResult]] = {}
    for (n, k, m), pairs in per.items():
        default = pairs[0][0].default
        done = [o for _, o in pairs if o.best_us is not None]
        best = min(done, key=lambda o: o.best_us) if done else None
        default_us = next((o.default_us for _, o in pairs if o.default_us is not None), None)
        notes = [o.skipped for _, o in pairs if o.skipped and o.best_us is None]
        results.setdefault((n, k), []).append(BucketResult(
            m=m, default=Choice(default.kernel, default.split_k),
            best=Choice(best.best.kernel, best.best.split_k) if best else None,
            best_us=best.best_us if best else None, default_us=default_us,
            trials=sum(o.complete + o.pruned for _, o in pairs),
            study=(best.task.name if best else pairs[0][0].name), note="; ".join(notes) or None))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shapes = model_shapes(args.model)
        arch = args.arch if args.arch == "auto" else normalize_archs([args.arch])[0]
        if args.list and arch != "auto":
            gpu = None
        else:
            gpu = detect_gpu(arch)
            arch = gpu.arch
        compiled = compiled_kernels(arch)
        tasks, spaces = make_tasks(shapes, arch, args.m_buckets, compiled, args.group, args.also_groups)
        if args.list:
            print_spaces(spaces, args.m_buckets)
            print(f"# {len(tasks)} studies")
            return 0
        from atom_ops import kernels
        if not kernels.available():
            raise NoGpuError("atom_ops._C is not built, so there is nothing to time: build it first "
                             "(tuning/README.md, step 1)")
        report_missing(spaces, arch, args.model)
        if not any(sp.compiled for _, sp in spaces):
            raise ConfigError(f"no compiled {arch} kernel runs these shapes (compiled: {sorted(compiled) or 'none'})")
        return tune(args, gpu, arch, shapes, tasks)
    except (NoGpuError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def tune(args, gpu, arch: str, shapes, tasks) -> int:
    import torch

    from .objective import CudaObjective, GemmProblem
    from .study import run_all, storage_url

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's float32 matmuls stay exact

    slug = gpu_slug(gpu.name)
    db = args.study_db or REPO / "build" / "tuning" / f"{slug}.sqlite3"
    out = args.out or table_path(slug)
    existing = read_table(out) if out.exists() else None
    if existing and existing.get("gpu") != gpu.name:  # checked now, not after the studies ran
        raise ConfigError(f"{out} is the table of {existing.get('gpu')!r}, this GPU is {gpu.name!r}: "
                          "pass another --out")
    problems: dict = {}

    def measure_factory(task):
        key = (task.m, task.space.n, task.space.k, task.space.group, task.space.outliers)
        if key not in problems:  # one problem alive at a time: large M x N operands are big
            problems.clear()
            problems[key] = GemmProblem(*key)
        return CudaObjective(problems[key], iters=args.iters, graph=not args.eager,
                             slow_factor=args.slow_factor).measure

    print(f"tuning {gpu.name} ({gpu.sm_count} SMs, cc {gpu.cc // 10}.{gpu.cc % 10}, arch {arch}): "
          f"{len(shapes)} shapes x {len(args.m_buckets)} M buckets x families = {len(tasks)} studies, up to "
          f"{args.trials} trials each; studies in {db}", flush=True)
    outcomes = run_all(tasks, measure_factory, storage_url(db), args.trials,
                       args.time_budget * 60 if args.time_budget else None, args.seed,
                       progress=not args.no_progress, gpu=gpu.name)
    problems.clear()

    results = bucket_results(tasks, outcomes)
    entries = []
    for s in shapes:
        if (s.n, s.k) in results:
            entries.append({"n": s.n, "k": s.k, "layers": list(s.layers),
                            "rules": shape_rules(results[(s.n, s.k)], args.min_gain)})
    meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in ["python", "-m", "tuning", *sys.argv[1:]]),
            "timing": "eager" if args.eager else "cuda_graph", "iters": args.iters, "group": args.group,
            "out_dtype": TUNE_DTYPE, "min_gain": args.min_gain, "m_buckets": args.m_buckets,
            "study_db": str(db.resolve().relative_to(REPO) if db.resolve().is_relative_to(REPO) else db),
            "op_revision": op_revision()}
    table = merge_table(existing, gpu.name, arch, entries, meta, {"sm_count": gpu.sm_count, "cc": gpu.cc})
    write_table(table, out)
    print_summary(results, args.min_gain, outcomes)
    print(f"wrote {out}; next: python -m generator --arch {arch} --tuning {out}")
    fatal = next((o.fatal for o in outcomes if o.fatal), None)
    if fatal:
        print(f"error: {fatal}", file=sys.stderr)
        return 1
    return 0


def op_revision() -> int | None:
    """atom_ops' op-path revision the timings belong to (tuning/runtime.py checks it)."""
    try:
        from atom_ops.kernels import OP_REVISION
    except ImportError:
        return None
    return OP_REVISION


def print_summary(results, min_gain: float, outcomes) -> None:
    print(f"{'N':>6} {'K':>6} {'M':>5} {'default us':>11} {'tuned us':>9} {'gain':>6}  choice")
    for (n, k), buckets in results.items():
        for b in sorted(buckets, key=lambda b: b.m):
            choice, us = b.chosen(min_gain)
            gain = f"{b.default_us / us:.2f}x" if us and b.default_us else "-"
            du = f"{b.default_us:.1f}" if b.default_us else "-"
            tu = f"{us:.1f}" if us else "-"
            print(f"{n:>6} {k:>6} {b.m:>5} {du:>11} {tu:>9} {gain:>6}  {choice.kernel} split_k={choice.split_k}"
                  + (f"  [{b.note}]" if b.note else ""))
    skipped = [o for o in outcomes if o.skipped and o.skipped != "already exhaustive"]
    if skipped:
        print(f"{len(skipped)} studies not run: {skipped[0].skipped}")
