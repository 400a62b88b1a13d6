"""Where a kernel's warps stall, from Nsight Compute's per-instruction (SASS) page.

    ncu --kernel-name regex:device_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \
        --section SourceCounters -o decode python -m bench.ncu_gemm --m 64 --n 4096 --k 4096 \
        --impls atom_kernel --kernel NAME
    ncu -i decode.ncu-rep --page source --csv --print-source sass > decode_sass.csv
    python -m bench.ncu_summary decode_sass.csv [--regions 0:450 450:720 ...] [--top 15]

Prints the sampled stall reasons over the whole kernel, the share of warp samples per SASS index
range (prologue, consumer loop, epilogue, producer: read them off the listing of --top) and the
instructions with the most samples. Samples are warp-time: a region that 12 warps run counts 12
times per cycle, one that 4 consumer warps run 4 times.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read_sass(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of `ncu --page source --csv --print-source sass` (its first line names the kernel)."""
    lines = list(csv.reader(path.read_text().splitlines()))
    for i, row in enumerate(lines):
        if SAMPLES in row and "Source" in row:
            return row, [r for r in lines[i + 1:] if len(r) == len(row)]
    raise ValueError(f"{path}: no '{SAMPLES}' column: not an ncu source page export (--page source --csv)")


def summarize(header: list[str], rows: list[list[str]], regions: list[tuple[int, int]], top: int) -> str:
    col = {name: i for i, name in enumerate(header)}
    stall_cols = [n for n in header if n.startswith("stall_") and "Not Issued" not in n]
    samples = [int(r[col[SAMPLES]] or 0) for r in rows]
    total = sum(samples) or 1
    out = [f"{len(rows)} SASS instructions, {sum(samples)} warp samples"]
    reasons = {n: sum(int(r[col[n]] or 0) for r in rows) for n in stall_cols}
    out.append("stall reasons (share of samples):")
    out += [f"  {n:24s} {v:7d} {100 * v / total:5.1f}%" for n, v in sorted(reasons.items(), key=lambda kv: -kv[1]) if v]
    if regions:
        out.append("SASS index ranges:")
        for lo, hi in regions:
            s = sum(samples[lo:hi])
            out.append(f"  [{lo}, {hi}) {s:7d} samples {100 * s / total:5.1f}%")
    out.append(f"top {top} instructions (index, samples, executed, top reasons):")
    for i in sorted(range(len(rows)), key=lambda j: -samples[j])[:top]:
        r = rows[i]
        why = sorted(((int(r[col[n]] or 0), n) for n in stall_cols), reverse=True)[:2]
        why_s = ", ".join(f"{n.removeprefix('stall_')} {v}" for v, n in why if v)
        out.append(f"  {i:5d} {samples[i]:5d} {r[col[EXECUTED]]:>8s}  {r[col['Source']].strip()[:60]:60s} {why_s}")
    return "\n".join(out)


def parse_region(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"region {text!r}: expected LO:HI (SASS indexes)") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"region {text!r}: need 0 <= LO < HI")
    return a, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ncu_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass output")
    p.add_argument("--regions", nargs="*", type=parse_region, default=[], metavar="LO:HI")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    try:
        header, rows = read_sass(args.csv)
    except (OSError, ValueError) as e:
        print(f"ncu_summary: {e}", file=sys.stderr)
        return 2
    print(summarize(header, rows, args.regions, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
