"""The candidate space of one study: compile-time configs crossed with runtime knobs.

Compile-time: every W4A4 config of the generator's level-2 manifest for the arch (plus any
compiled kernel of that arch, e.g. from an earlier table) that runs the shape. Only compiled
ones can be timed; the rest are reported as missing (build them with a wider manifest).
Runtime knobs: the split-K factor, for kernels built with the split-K epilogue. The mma family
has no other runtime knob (no raster order or swizzle parameter in its launch ABI).

Kernels are tuned in their fp16-output variant; the generator emits both output dtypes of every
table kernel, and bf16 dispatch follows the same rules.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from atom_ops.formats import QuantSpec
from atom_ops.staging import max_split_k
from generator.configs import WGMMA_GROUP, ConfigError, KernelConfig
from generator.dispatch import default_dispatch
from generator.manifest import DEFAULT_OUTLIERS, default_manifest, outliers_for

TUNE_DTYPE = "f16"
DEFAULT_GROUP = 128
SPLIT_K_FACTORS = (2, 3, 4, 6, 8, 12, 16)


@dataclass(frozen=True, order=True)
class Candidate:
    kernel: str
    split_k: int = 1

    def __str__(self) -> str:
        return self.kernel + (f" split_k={self.split_k}" if self.split_k > 1 else "")


@dataclass(frozen=True)
class ShapeSpace:
    """What one study searches: kernels of one family and arch for one (N, K)."""

    arch: str
    family: str
    n: int
    k: int
    group: int
    outliers: int
    kernels: tuple[str, ...]        # every candidate config name (compiled or not)
    compiled: tuple[str, ...]       # the subset compiled into atom_ops._C (timeable)
    split_factors: tuple[int, ...]  # split-K factors besides 1, for split-K kernels

    def candidates(self) -> list[Candidate]:
        out = []
        for name in self.compiled:
            out.append(Candidate(name, 1))
            if KernelConfig.from_name(name).split_k:
                out += [Candidate(name, s) for s in self.split_factors]
        return out

    def missing(self) -> list[str]:
        return [k for k in self.kernels if k not in self.compiled]

    def fingerprint(self) -> str:
        """Short hash of the searchable space: a study's categorical choices must never change,
        so a different build gets its own study (the old one stays in the database)."""
        text = "|".join(self.compiled) + "#" + ",".join(map(str, self.split_factors))
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def study_name(self, m: int) -> str:
        return f"{self.arch}/{self.family}/N{self.n}_K{self.k}/M{m}/space-{self.fingerprint()}"


def runs_shape(cfg: KernelConfig, n: int, k: int, groups) -> bool:
    """Whether ``cfg`` runs (N, K) for every group in ``groups`` (outliers by atom_ops' rule)."""
    ran = False
    for g in groups:
        try:
            o = outliers_for(k, g, DEFAULT_OUTLIERS)
        except ConfigError:
            continue  # this K cannot be quantized with group g at all
        if not cfg.supports(k, g, o, n):
            return False
        ran = True
    return ran


def manifest_configs(arch: str) -> list[KernelConfig]:
    """The level-2 manifest's configs for ``arch`` in the tuning dtype."""
    return [c for c in default_manifest([arch], level=2).configs(arch) if c.out_dtype == TUNE_DTYPE]


def build_spaces(arch: str, n: int, k: int, compiled: set[str], group: int = DEFAULT_GROUP,
                 also_groups: tuple[int, ...] = ()) -> list[ShapeSpace]:
    """One space per kernel family for (N, K) on ``arch``; ``compiled`` = names in atom_ops._C.

    Candidates must run the tuned ``group``; ``also_groups`` adds groups they must run too. The
    compiled dispatch picks by (M, N, K) only, but the binding's plan() falls back to a kernel
    that can run a call the chosen one cannot (e.g. group 64 on a group-128 kernel), so
    group-specific kernels (tile_k=128, the wgmma family) are fair candidates."""
    outliers = outliers_for(k, group, DEFAULT_OUTLIERS)
    groups = tuple(sorted({group, *also_groups}))
    configs = {c.name: c for c in manifest_configs(arch)}
    for name in compiled:
        try:
            c = KernelConfig.from_name(name)
        except ConfigError:
            continue
        if c.arch == arch and c.out_dtype == TUNE_DTYPE:
            configs.setdefault(name, c)
    by_family: dict[str, list[str]] = {}
    for name, c in sorted(configs.items()):
        if runs_shape(c, n, k, groups):
            by_family.setdefault(c.family, []).append(name)
    n_groups = (k - outliers) // group
    # mma: one split per group at most; wgmma (_w4 split-K): staging.max_split_k
    wgmma_limit = max_split_k(QuantSpec(k, group, outliers)) if group == WGMMA_GROUP else 0
    limit = {"mma": n_groups, "wgmma": wgmma_limit}
    return [ShapeSpace(arch, fam, n, k, group, outliers, tuple(names),
                       tuple(x for x in names if x in compiled),
                       tuple(s for s in SPLIT_K_FACTORS if s <= limit.get(fam, n_groups)))
            for fam, names in sorted(by_family.items())]


def default_choice(arch: str, m: int) -> Candidate:
    """The generator's untuned dispatch choice for M rows (fp16 output)."""
    for rule in default_dispatch(arch).for_dtype(TUNE_DTYPE).rules:
        if rule.max_m is None or m <= rule.max_m:
            return Candidate(rule.kernel.name, rule.split_k)
    raise AssertionError("default dispatch has an unbounded last rule")
