"""The dispatch table ``tuning/tables/<gpu-slug>.json``: build, validate, write, look up.

Schema: the generator's tuning table, version 1 (``generator/dispatch.py``), which the
generator reads unchanged. ``python -m tuning`` adds optional fields that the generator
ignores (it reads only ``max_m``, ``kernel`` and ``split_k`` of a rule and ``n``, ``k``,
``rules`` of a shape), so every table stays a valid version-1 table::

    {"schema_version": 1,
     "gpu": "NVIDIA H100 80GB HBM3",
     "gpu_info": {"sm_count": 132, "cc": 90},                        # optional
     "tuning": {"created": "...", "command": "python -m tuning ...",  # optional: how it was measured
                "timing": "cuda_graph", "iters": 20, "group": 128, "out_dtype": "f16",
                "min_gain": 0.02, "study_db": "tuning/studies/<gpu>.sqlite3",
                "op_revision": 2},      # atom_ops.kernels.OP_REVISION; run-time use needs a match
     "archs": {"sm90a": {
         "rules": [...],             # generic rules (unknown shapes): the generator's default dispatch
         "shapes": [{"n": 4096, "k": 4096, "layers": ["llama-7b/o"],       # "layers": optional
                     "rules": [{"max_m": 16, "kernel": "<name>", "split_k": 4,
                                "buckets": [                                # optional, per measured M
                                  {"m": 16, "median_us": 10.2, "default_us": 12.9,
                                   "default_kernel": "<name>", "default_split_k": 4,
                                   "trials": 24, "study": "sm90a/mma/N4096_K4096/M16/space-..."}]},
                               {"max_m": null, ...}]}]}}}

Rules of a shape: one per tuned M bucket, ``max_m`` = the bucket's M (the last one unbounded),
adjacent buckets with the same choice merged (their ``buckets`` lists concatenated). A bucket
keeps the default's choice unless the best candidate is at least ``min_gain`` faster, or when it
has no measurement (``median_us`` null and a ``note``). Kernel names are the fp16 variants;
dispatch of bf16 outputs uses the bf16 variant of the same config.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from generator.configs import ConfigError, KernelConfig
from generator.dispatch import SCHEMA_VERSION, default_dispatch, load_tuning

TABLES = Path(__file__).resolve().parent / "tables"


@dataclass(frozen=True)
class Choice:
    kernel: str
    split_k: int = 1


@dataclass(frozen=True)
class BucketResult:
    """The outcome of one study (one M bucket of one shape), as recorded in the table."""

    m: int
    default: Choice
    best: Choice | None = None
    best_us: float | None = None
    default_us: float | None = None
    trials: int = 0
    study: str = ""
    note: str | None = None

    def chosen(self, min_gain: float) -> tuple[Choice, float | None]:
        """The dispatch choice and its time: the best unless the default is within min_gain."""
        if self.best is None or self.best_us is None:
            return self.default, self.default_us
        if self.default_us is not None and self.best_us > self.default_us * (1 - min_gain):
            return self.default, self.default_us
        return self.best, self.best_us


def table_path(gpu_slug: str) -> Path:
    return TABLES / f"{gpu_slug}.json"


def default_rules(arch: str) -> list[dict]:
    return [{"max_m": r.max_m, "kernel": r.kernel.name, "split_k": r.split_k} for r in default_dispatch(arch).rules]


def shape_rules(buckets: list[BucketResult], min_gain: float) -> list[dict]:
    """M-bucket rules for one shape (module doc); raises ConfigError for an empty list."""
    if not buckets:
        raise ConfigError("no M buckets to make rules from")
    buckets = sorted(buckets, key=lambda b: b.m)
    if len({b.m for b in buckets}) != len(buckets):
        raise ConfigError(f"duplicate M buckets {[b.m for b in buckets]}")
    rules: list[dict] = []
    for i, b in enumerate(buckets):
        choice, us = b.chosen(min_gain)
        rec = {"m": b.m, "median_us": us, "default_us": b.default_us, "default_kernel": b.default.kernel,
               "default_split_k": b.default.split_k, "trials": b.trials, "study": b.study}
        if b.note:
            rec["note"] = b.note
        max_m = None if i == len(buckets) - 1 else b.m
        if rules and (rules[-1]["kernel"], rules[-1]["split_k"]) == (choice.kernel, choice.split_k):
            rules[-1]["max_m"] = max_m
            rules[-1]["buckets"].append(rec)
        else:
            rules.append({"max_m": max_m, "kernel": choice.kernel, "split_k": choice.split_k, "buckets": [rec]})
    return rules


def merge_table(existing: dict | None, gpu: str, arch: str, shapes: list[dict], meta: dict | None = None,
                gpu_info: dict | None = None) -> dict:
    """``existing`` (or a new table) with ``shapes`` ({"n", "k", "rules", ...}) replacing entries
    of the same (N, K) for ``arch``; other archs and shapes are kept (tables accumulate models)."""
    table = json.loads(json.dumps(existing)) if existing else {"schema_version": SCHEMA_VERSION, "gpu": gpu}
    if table.get("gpu") != gpu:
        raise ConfigError(f"the table at hand is for {table.get('gpu')!r}, not {gpu!r}: use another --out")
    if gpu_info:
        table["gpu_info"] = gpu_info
    if meta:
        table["tuning"] = meta
    body = table.setdefault("archs", {}).setdefault(arch, {})
    body.setdefault("rules", default_rules(arch))
    by_nk = {(s["n"], s["k"]): s for s in body.get("shapes", [])}
    for s in shapes:
        by_nk[(s["n"], s["k"])] = s
    body["shapes"] = [by_nk[nk] for nk in sorted(by_nk)]
    return table


def validate_table(table: dict) -> None:
    """Raise ConfigError unless the generator accepts ``table`` (it is read back with load_tuning)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "table.json"
        p.write_text(json.dumps(table))
        load_tuning(p)


def write_table(table: dict, path: str | Path) -> Path:
    """Validate, then write atomically (a failed run never leaves a half-written table)."""
    validate_table(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_table(path: str | Path) -> dict:
    """The table's JSON after the generator's validation (ConfigError on any problem)."""
    load_tuning(path)
    return json.loads(Path(path).read_text())


def _pick(rules: list[dict], m: int) -> dict:
    for r in rules:
        if r["max_m"] is None or m <= r["max_m"]:
            return r
    raise ConfigError("rules without an unbounded last rule")


def lookup(table: dict, arch: str, m: int, n: int, k: int, out_dtype: str = "f16",
           generic: bool = True) -> Choice | None:
    """The table's (kernel, split_k) for a call: the (N, K) rules if tuned, else the generic
    rules (``generic=False``: None for an untuned shape). None when the table lacks ``arch``."""
    body = table.get("archs", {}).get(arch)
    if not body:
        return None
    rules = next((s["rules"] for s in body.get("shapes", []) if s["n"] == n and s["k"] == k), None)
    if rules is None:
        if not generic or not body.get("rules"):
            return None
        rules = body["rules"]
    r = _pick(rules, m)
    name = KernelConfig.from_name(r["kernel"]).replace(out_dtype=out_dtype).name
    return Choice(name, int(r.get("split_k", 1)))
