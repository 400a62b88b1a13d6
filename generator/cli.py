"""Command line: ``python -m generator --arch sm80 [sm89 sm90a ...] [options]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .configs import ARCHS, ConfigError
from .dispatch import load_tuning
from .manifest import default_manifest, model_shapes
from .paths import DEFAULT_OUT
from .render import emit

EPILOG = """\
examples:
  python -m generator --arch sm80 sm89            emit the default (CI) manifest for two archs
  python -m generator --arch sm89 --model llama-7b --list
  python -m generator --arch sm80 --level 1 --out /tmp/gen
  python -m generator --arch sm80 --tuning tuning/tables/rtx4090.json

Output layout: <out>/include/, <out>/<arch>/<kernel>.cu, <out>/<arch>/registry.cpp,
<out>/registry_all.cpp, <out>/binding.cpp, <out>/sources.cmake, <out>/manifest.json.
Files are rewritten only when their content changes; generated files that this run does
not produce are removed by name.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m generator", description="Emit CUDA sources for Atom's W4A4 "
                                "GEMM kernels (CUTLASS-based) into build/generated/<arch>/.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", required=True, metavar="ARCH",
                   help=f"target arch(es), one or more of: {', '.join(ARCHS)} "
                        "(also accepted: 80, 89, 90a, 'sm_80', comma or semicolon lists)")
    p.add_argument("--model", action="append", default=[], metavar="NAME|config.json",
                   help="cover this model's linear shapes (qkv, o, gate_up, down): a preset name "
                        "(llama-7b, llama-2-13b, llama-3-8b, smollm2-135m) or an HF config.json; "
                        "repeatable. Kernels that run none of the shapes are culled, and a shape no "
                        "kernel runs is an error")
    p.add_argument("--level", type=int, default=0, metavar="N",
                   help="manifest size: 0 = default (4 mma tiles x fp16/bf16 per arch + the sm90a wgmma tiles, what CI compiles), "
                        "1 = more tiles, 2 = full cross product of the tile tables (default: 0)")
    p.add_argument("--tuning", type=Path, metavar="TABLE.json",
                   help="dispatch table from `python -m tuning` (schema in generator/dispatch.py); emits "
                        "only its kernels plus a safe fallback for the archs it covers")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--list", action="store_true",
                   help="print the manifest (kernel names, culls, shape coverage) and write nothing")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log culls and written files (-vv: every kept kernel too)")
    return p.parse_args(argv)


def normalize_archs(values) -> list[str]:
    out = []
    for v in values:
        for a in v.replace(";", ",").split(","):
            a = a.strip().lower().replace("sm_", "sm")
            if not a:
                continue
            if not a.startswith("sm"):
                a = "sm" + a
            if a == "sm90":
                a = "sm90a"
            if a not in ARCHS:
                raise ConfigError(f"unknown arch {a!r}; known: {', '.join(ARCHS)}")
            if a not in out:
                out.append(a)
    if not out:
        raise ConfigError("no arch given")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(message)s")
    try:
        archs = normalize_archs(args.arch)
        shapes = [s for m in args.model for s in model_shapes(m)]
        dispatch = load_tuning(args.tuning) if args.tuning else None
        if dispatch:
            unknown = [a for a in dispatch if a not in ARCHS]
            if unknown:
                raise ConfigError(f"tuning table names unknown archs {unknown}")
        manifest = default_manifest(archs, args.level, shapes, dispatch)
        missing = [(s, g, o) for s, g, o, names in manifest.coverage() if not names]
        if missing:
            lines = ", ".join(f"{s.model}/{s.layer} N={s.n} K={s.k} (group {g}, outliers {o})" for s, g, o in missing)
            raise ConfigError(f"no kernel in the manifest runs: {lines}")
        if args.list:
            for name in manifest.names():
                print(name)
            print(f"# {len(manifest)} kernels for {', '.join(archs)}; {len(manifest.culled)} culled")
            for name, why in manifest.culled:
                print(f"# culled {name}: {why}")
            for s, g, o, names in manifest.coverage():
                print(f"# shape {s.model}/{s.layer} N={s.n} K={s.k} group={g} outliers={o}: {len(names)} kernels")
            return 0
        res = emit(manifest, args.out, dispatch)
        print(f"generator: {len(manifest)} kernels for {', '.join(archs)} -> {args.out} "
              f"({len(res['written'])} written, {res['unchanged']} unchanged, {len(res['removed'])} removed)")
        return 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
