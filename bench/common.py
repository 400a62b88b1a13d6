"""Timing and result helpers shared by the benches (DESIGN.md "Measuring").

- ``time_cuda(fn)``: CUDA events around each call, warm-up, L2 flushed before every timed
  call (a write over a buffer larger than L2), median of ``iters`` (>= 20) in microseconds.
- ``write_json(path, bench, rows, command)``: the one result schema
  ``{"bench", "gpu", "versions", "command", "rows": [{"case": {...}, "impl": ..., "median_us": ...}]}``.
- ``print_table(rows, ...)``: a plain-text table.
- ``pyplot()``, ``finish_m_plot(...)``: the benches' matplotlib setup and "speedup vs M" axes.
- ``write_results(...)``: JSON + text table + PNG under one stem, the way every bench saves.
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class L2Flusher:
    """Evicts earlier data from L2 between timed calls by reading a buffer twice the L2 size.

    Reading, not writing: a written buffer leaves L2 full of dirty lines, which the timed kernel then
    writes back to DRAM as its own reads evict them. That is the flush's cost, charged to whatever
    runs next: on our H100 it added ~9 us to every memory-bound call (KV4 decode at Llama-3-8B batch 64
    context 2048: 68.2 -> 59.0 us; torch SDPA 190.6 -> 181.3 us; an fp16 4096^2 GEMV 23.1 -> 18.9 us),
    which understates the ratio of a kernel that moves fewer bytes."""

    def __init__(self, device=None):
        props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
        l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
        self.buf = torch.ones(2 * l2 // 4, dtype=torch.int32, device="cuda")  # written once, here
        self.sink = torch.empty((), dtype=torch.int32, device="cuda")

    def __call__(self):
        torch.amax(self.buf, dim=0, out=self.sink)  # reads every line; writes one word


def time_cuda(fn, iters: int = 20, warmup: int = 3, flush: L2Flusher | None = None, graph: bool = False) -> dict:
    """Median / min / max microseconds of ``fn()`` over ``iters`` runs (CUDA events).

    ``graph=True`` captures ``fn`` into a CUDA graph after the warm-up and times its replays,
    which removes host (Python, launch) overhead from the numbers; the L2 flush stays outside.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    flush = flush or L2Flusher()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        fn = g.replay
        fn()
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    us = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return {"median_us": statistics.median(us), "min_us": min(us), "max_us": max(us), "iters": iters}


def add_run_args(p, iters: int = 20) -> None:
    """The options every bench takes: --iters, --out, --tag (each bench derives its default tag)."""
    p.add_argument("--iters", type=int, default=iters, help="timed calls per case (median; >= 20 for reports)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    p.add_argument("--tag", default=None, help="file-name tag (default: from the GPU name)")


def cuda_missing(prog: str) -> bool:
    """True (after saying so on stderr) when there is no CUDA GPU for a GPU-only bench."""
    if torch.cuda.is_available():
        return False
    print(f"{prog} needs a CUDA GPU", file=sys.stderr)
    return True


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda}
    try:
        import importlib.metadata as md
        v["nvidia-cutlass"] = md.version("nvidia-cutlass")
    except Exception:  # noqa: BLE001 - optional
        pass
    return v


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def command_line(module: str | None = None, argv: list[str] | None = None) -> str:
    """The command that ran this bench, e.g. ``python -m bench.gemm --models llama-7b``. ``argv``: the
    arguments main() parsed when they are not the process's (one bench run from another's process)."""
    head = ["python", "-m", module] if module else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in head + (sys.argv[1:] if argv is None else list(argv)))


def write_json(path: Path, bench: str, rows: list[dict], command: str | None = None, **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"bench": bench, "gpu": gpu_name(), "versions": versions(), "command": command or command_line(),
            "rows": rows, **extra}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str], echo: bool = True) -> str:
    """Format dict rows as an aligned text table (returns it, and prints it unless echo=False); a
    missing cell prints "-" (a blank one would shift the columns for a reader splitting on whitespace)."""
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    if echo:
        print(text)
    return text


def default_tag() -> str:
    """File-name tag of this GPU (e.g. NVIDIA_H100_80GB_HBM3)."""
    return gpu_name().replace(" ", "_").replace("/", "_")


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None (noted on stderr) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return None
    return plt


def new_figure(size=(8, 5)):
    """(fig, ax) for a bench plot, or None without matplotlib."""
    plt = pyplot()
    return None if plt is None else plt.subplots(figsize=size)


def draw_series(ax, series: dict[tuple[str, str], list[tuple[float, float]]]) -> None:
    """One line per (kind, group) key, points sorted by x: a colour per kind, a line style per group."""
    kinds = sorted({kind for kind, _ in series})
    groups = sorted({group for _, group in series})
    for (kind, group), pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{kinds.index(kind) % 10}",
                ls=("-", "--", ":", "-.")[groups.index(group) % 4], label=f"{kind} {group}")


def series_plot(path: Path, series: dict[tuple[str, str], list[tuple[float, float]]], ylabel: str, title: str,
                xlabel: str = "M (tokens)", reference: float | None = None, ncol: int = 1) -> Path | None:
    """draw_series on a new figure (plus a dashed horizontal reference line), saved to ``path``;
    None without matplotlib."""
    figure = new_figure((9, 5.5) if ncol > 1 else (8, 5))
    if figure is None:
        return None
    fig, ax = figure
    draw_series(ax, series)
    if reference is not None:
        ax.axhline(reference, color="gray", lw=0.8, ls="--")
    return finish_m_plot(fig, ax, path, ylabel, title, ncol=ncol, xlabel=xlabel)


def label_m_axes(ax, ylabel: str, title: str, legend_size: int = 7, ncol: int = 1, xlabel: str = "M (tokens)") -> None:
    """Log2 x axis (token count by default), labels, legend of one panel."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size, ncol=ncol)


def finish_m_plot(fig, ax, path: Path, ylabel: str, title: str, legend_size: int = 7, ncol: int = 1,
                  xlabel: str = "M (tokens)") -> Path:
    """label_m_axes, then saves the figure to ``path``."""
    label_m_axes(ax, ylabel, title, legend_size, ncol, xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_results(out: Path, stem: str, bench: str, rows: list[dict], table_rows: list[dict], columns: list[str],
                  command: str, plot=None, footer: str = "", **extra) -> None:
    """``<out>/<stem>.json`` (write_json schema), ``.txt`` (the printed table + footer) and, when
    ``plot(path)`` is given and matplotlib is present, ``.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = write_json(out / f"{stem}.json", bench, rows, command, **extra)
    text = print_table(table_rows, columns)
    if footer:
        print(footer)
    (out / f"{stem}.txt").write_text(text + "\n" + (footer + "\n" if footer else ""))
    png = plot(out / f"{stem}.png") if plot else None
    print(f"wrote {jpath}" + (f" and {png}" if png else ""))
