"""The accuracy ladder of Atom's Table 4 on a real model: each row adds one technique."""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch

from .eval import perplexity
from .quantize import quantize_model
from .recipe import Recipe, ablation_ladder


def run_ladder(model, split, groups=(128,), windows: int | None = None, progress: bool = True,
               rows: list[tuple[str, Recipe | None]] | None = None) -> list[dict]:
    """Perplexity of every ladder row on ``split.eval_windows[:windows]``.

    Each quantized row starts from a fresh copy of the floating-point model and is calibrated
    on ``split.calib_windows``. Rows shared by several group sizes are run once.
    """
    eval_windows = split.eval_windows[:windows] if windows else split.eval_windows
    if rows is None:
        rows, seen = [], set()
        for g in groups:
            for name, recipe in ablation_ladder(g):
                if recipe not in seen:
                    seen.add(recipe)
                    rows.append((name, recipe))
    results = []
    for name, recipe in rows:
        t0 = time.time()
        if recipe is None:
            ppl = perplexity(model, eval_windows, progress=progress)
        else:
            qmodel = copy.deepcopy(model)
            quantize_model(qmodel, split.calib_windows, recipe, progress=progress)
            ppl = perplexity(qmodel, eval_windows, progress=progress)
            del qmodel
        results.append({"name": name, "ppl": ppl, "recipe": recipe.to_dict() if recipe else None,
                        "seconds": round(time.time() - t0, 1)})
        if progress:
            print(f"{name:40s} ppl {ppl:.3f}", flush=True)
    return results


def to_markdown(rows: list[dict]) -> str:
    base = next((r["ppl"] for r in rows if r["recipe"] is None), None)
    lines = ["| method | WikiText-2 ppl | vs FP16 |", "|---|---:|---:|"]
    for r in rows:
        rel = f"{100 * (r['ppl'] / base - 1):+.1f}%" if base else "n/a"
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {rel} |")
    return "\n".join(lines)


def write_results(rows: list[dict], protocol: dict, model_name: str, out_json: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": model_name, "protocol": protocol,
           "machine": {"torch": torch.__version__, "python": platform.python_version(),
                       "device": protocol.get("device", "cpu")},
           "rows": rows}
    out_json.write_text(json.dumps(doc, indent=2))
    out_json.with_suffix(".md").write_text(to_markdown(rows) + "\n")
