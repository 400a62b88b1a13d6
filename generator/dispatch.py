"""Dispatch rules: which kernel (and split-K factor) runs a call, by M bucket.

Rules are data, validated here and rendered into a C++ if-chain per arch and output dtype
(thresholds are integers checked in Python, never hand-written C++ strings). A rule set is an
ordered list of ``DispatchRule``: the first rule whose ``max_m`` >= M wins, the last rule
must have ``max_m=None`` (no upper bound). Optional per-shape rule sets (exact N, K) come
first, then the generic one.

Tuning table (``--tuning FILE``), schema version 1::

    {"schema_version": 1, "gpu": "NVIDIA ...",
     "archs": {"sm80": {
         "rules":  [{"max_m": 16, "kernel": "<kernel name>", "split_k": 4},
                    {"max_m": null, "kernel": "<kernel name>", "split_k": 1}],
         "shapes": [{"n": 4096, "k": 4096, "rules": [...]}]}}}

Kernel names are ``KernelConfig.name`` strings; the table's kernels are added to the manifest
(whatever their output dtype, the generator emits both dtypes so fp16 and bf16 dispatch alike).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .configs import ConfigError, KernelConfig

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DispatchRule:
    max_m: int | None
    kernel: KernelConfig
    split_k: int = 1

    def check(self) -> None:
        if self.max_m is not None and self.max_m < 1:
            raise ConfigError(f"dispatch rule max_m={self.max_m} must be >= 1 or null")
        if self.split_k < 1:
            raise ConfigError(f"dispatch rule for {self.kernel.name}: split_k={self.split_k} must be >= 1")
        if self.split_k > 1 and not self.kernel.split_k:
            raise ConfigError(f"dispatch rule asks split_k={self.split_k} of {self.kernel.name}, "
                              "which was not built with split-K")


def check_rules(rules: list[DispatchRule], where: str) -> None:
    if not rules:
        raise ConfigError(f"{where}: empty rule list")
    prev = 0
    for i, r in enumerate(rules):
        r.check()
        last = i == len(rules) - 1
        if r.max_m is None and not last:
            raise ConfigError(f"{where}: rule {i} has max_m=null but is not the last rule")
        if last and r.max_m is not None:
            raise ConfigError(f"{where}: the last rule must have max_m=null (covers every M)")
        if r.max_m is not None:
            if r.max_m <= prev:
                raise ConfigError(f"{where}: max_m must increase ({r.max_m} after {prev})")
            prev = r.max_m


@dataclass(frozen=True)
class ArchDispatch:
    rules: tuple[DispatchRule, ...]
    shapes: tuple[tuple[int, int, tuple[DispatchRule, ...]], ...] = ()

    def kernels(self) -> list[KernelConfig]:
        out = [r.kernel for r in self.rules]
        for _, _, rs in self.shapes:
            out += [r.kernel for r in rs]
        return out

    def for_dtype(self, out_dtype: str) -> "ArchDispatch":
        def conv(rs):
            return tuple(DispatchRule(r.max_m, r.kernel.replace(out_dtype=out_dtype), r.split_k) for r in rs)
        return ArchDispatch(conv(self.rules), tuple((n, k, conv(rs)) for n, k, rs in self.shapes))


def default_dispatch(arch: str) -> ArchDispatch:
    """Built-in rules: small tile with split-K for decode, small tile, then the large tile.
    sm90a: the mma family's stream kernels up to M = 16 (4-bit weights read once: 1.5-1.8x the
    wgmma decode tile there, bench/results/gemm_h100_stream.txt), then the wgmma
    family (swap-AB decode tile up to M = 64, swap-AB medium tile up to 512, then the prefill
    tile with the overlapped promotion: the measured best per range on our H100,
    bench/results/gemm_h100_ovl.txt); calls a kernel cannot run (group 64 on the stream and
    wgmma kernels) fall back at run time to the first compiled kernel that can (the binding's
    plan()), i.e. the mma family's multistage tiles."""
    from .manifest import LARGE, SMALL, STREAM, STREAM_M8, WGMMA_DECODE, WGMMA_MEDIUM, WGMMA_PREFILL
    if arch == "sm90a":
        rules = (DispatchRule(8, STREAM_M8.replace(arch=arch)), DispatchRule(16, STREAM.replace(arch=arch)),
                 DispatchRule(64, WGMMA_DECODE), DispatchRule(512, WGMMA_MEDIUM), DispatchRule(None, WGMMA_PREFILL))
        check_rules(list(rules), f"default dispatch for {arch}")
        return ArchDispatch(rules)
    small = SMALL.replace(arch=arch)
    large = LARGE.replace(arch=arch)
    rules = (DispatchRule(16, small, 4), DispatchRule(128, small, 1), DispatchRule(None, large, 1))
    check_rules(list(rules), f"default dispatch for {arch}")
    return ArchDispatch(rules)


def _parse_rules(items, arch: str, where: str) -> tuple[DispatchRule, ...]:
    rules = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "kernel" not in it or "max_m" not in it:
            raise ConfigError(f"{where}: rule {i} must be an object with max_m and kernel")
        cfg = KernelConfig.from_name(it["kernel"])
        if cfg.arch != arch:
            raise ConfigError(f"{where}: kernel {cfg.name} is for {cfg.arch}, not {arch}")
        cfg.validate()
        rules.append(DispatchRule(it["max_m"], cfg, int(it.get("split_k", 1))))
    check_rules(rules, where)
    return tuple(rules)


def load_tuning(path: str | Path) -> dict[str, ArchDispatch]:
    """Read a tuning table; returns {arch: ArchDispatch}. Raises ConfigError on any problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"tuning table not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"tuning table {path} is not valid JSON: {e}") from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path}: schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    archs = data.get("archs")
    if not isinstance(archs, dict):
        raise ConfigError(f"{path}: missing 'archs' object")
    out = {}
    for arch, body in archs.items():
        where = f"{path} [{arch}]"
        rules = _parse_rules(body.get("rules", []), arch, where)
        shapes = []
        for s in body.get("shapes", []):
            n, k = int(s["n"]), int(s["k"])
            shapes.append((n, k, _parse_rules(s["rules"], arch, f"{where} N={n} K={k}")))
        out[arch] = ArchDispatch(rules, tuple(shapes))
    return out
