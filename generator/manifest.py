"""The manifest: which kernel configs to emit, per arch. Validated, deduplicated, culls logged.

``Manifest.append(cfg)`` raises ``ConfigError`` for an impossible config (``strict=True``,
the default) or logs it as culled (``strict=False``, used when crossing tables at higher
levels); configs for archs not selected and duplicates are culled with a log line.

Levels (``--level``):
    0  (default, what CI compiles) per arch: the large tile, the small split-K tile and two
       stream (decode) tiles, fp16 and bf16 output -> 8 kernels per arch; sm90a adds the wgmma family's decode,
       medium and prefill tiles, the _w4 medium tile and two split-K tiles (12 more). Every level also
       builds the kernels a committed tuning table (tuning/tables/*.json) picks for the arch: the H100
       table adds 7 tiles (14 kernels) to sm90a.
    1  adds a medium tile and tile_k=128 variants (group % 128 == 0 only).
    2  the cross product of the tile / warp / stage tables below, invalid ones culled.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from .configs import ARCHS, ConfigError, Int8GemmConfig, KernelConfig, OUT_DTYPES, arch_info
from .paths import FORMAT_RULES, MODELS_CONFIG, TUNING_TABLES

log = logging.getLogger("generator")

# The built-in tiles (arch filled in per arch). tile_k=64 runs any group % 64 == 0 and any
# outlier count % 32 == 0.
LARGE = KernelConfig("mma", "sm80", tile_m=128, tile_n=128, tile_k=64, warp_m=64, warp_n=32, stages=4)
SMALL = KernelConfig("mma", "sm80", tile_m=16, tile_n=64, tile_k=64, warp_m=16, warp_n=16, stages=6,
                     split_k=True)
LEVEL1 = (
    KernelConfig("mma", "sm80", 64, 128, 64, 32, 32, 4),
    KernelConfig("mma", "sm80", 32, 128, 64, 32, 32, 4, split_k=True),
    KernelConfig("mma", "sm80", 128, 128, 128, 64, 32, 3),
    KernelConfig("mma", "sm80", 16, 64, 128, 16, 16, 4, split_k=True),
)
# The mma family's decode kernel (schedule "stream": swap-AB, 4-bit weights streamed through a
# per-warp cp.async ring into s8 x s8 mma fragments, K split over 4 warps of the CTA): 16 tokens x
# 32 weight rows per CTA, 4 chunks (64 bytes per row) in flight per warp. Group % 128 == 0,
# outliers % 64 == 0. Level-1 variants fit every arch's shared memory (sm86 / sm89: 99 KB).
STREAM = KernelConfig("mma", "sm80", tile_m=16, tile_n=32, tile_k=128, warp_m=16, warp_n=16, stages=4,
                      warps_k=4, schedule="stream")
# 8 tokens per CTA, 3 chunks in flight (more CTAs per SM): the fastest at M <= 8 on our H100
# before the s8 x s8 rewrite (1.2-1.4 TB/s of 4-bit weights at M = 1 on the Llama-7B shapes).
STREAM_M8 = STREAM.replace(tile_m=8, warp_m=8, stages=3)
# Tuning candidates (python .dev/time_stream.py on a level-1 build times them all): deeper rings,
# twice the CTAs (tile_n 16: 1 row warp x 8 K warps, every chunk of a K = 4096 row in flight at
# once), 32 rows per warp, split-K for the 8-token tile (N = 4096 fills only 128 CTAs), and the
# larger token tiles.
STREAM_LEVEL1 = (
    STREAM_M8.replace(stages=5),
    STREAM_M8.replace(tile_n=16, warps_k=8, stages=5),
    STREAM_M8.replace(tile_n=16, stages=6),
    STREAM_M8.replace(tile_n=64, warp_n=32),
    STREAM_M8.replace(stages=4, split_k=True),
    STREAM.replace(tile_n=16, warps_k=8),
    STREAM.replace(tile_n=64, warps_k=2),
    STREAM.replace(tile_n=64, warp_n=32, stages=2),
    STREAM.replace(tile_m=32, warp_m=32, stages=2),
    STREAM.replace(tile_m=64, warp_m=64, stages=2, warps_k=2),
    STREAM.replace(split_k=True),
)
# sm90a wgmma family (group 128 only), the fastest of the level-1 sweep on our H100 per M range
# (bench/results/gemm_h100_wgmma_sweep.txt): a swap-AB decode tile (weights x tokens, ping-pong),
# a swap-AB medium tile (cooperative) and the prefill tile (cooperative, 2-CTA cluster along
# the weights). All run our mainloop (promotion="overlap", atom_wgmma_overlap.cuh: overlapped
# promotion, INT8 outlier k-tiles, the reference's arithmetic bit for bit).
WGMMA_DECODE = KernelConfig("wgmma", "sm90a", 64, 32, 128, 64, 32, 0, group=128, schedule="pingpong",
                            swap_ab=True, promotion="overlap")
WGMMA_MEDIUM = KernelConfig("wgmma", "sm90a", 128, 64, 128, 64, 64, 0, group=128, schedule="cooperative",
                            swap_ab=True, promotion="overlap")
WGMMA_PREFILL = KernelConfig("wgmma", "sm90a", 128, 128, 128, 64, 128, 0, group=128, cluster=(1, 2, 1),
                             schedule="cooperative", promotion="overlap")
# The swap-AB tiles reading the weights as 4-bit register fragments (weights="frag4", _w4;
# atom_ops.staging.weight_fragments, register-operand wgmma): half the weight bytes, the same bits.
# Measured (bench/results/gemm_h100_w4.txt): faster than the byte-staged tiles only where the
# weight stream dominates (gate_up, 12288-row qkv at M = 16..64: 1.05-1.2x); the 4096-row layers
# are bound by each CTA's serial k-tile chain, not bytes, and run slower. The medium tile and
# its split-K variants are built by default (tested everywhere, tuning candidates), the others at
# level 1.
WGMMA_MEDIUM_W4 = WGMMA_MEDIUM.replace(weights="frag4")
# Split-K (run-time factor; CUTLASS's stream-K scheduler in SplitK mode, cooperative schedule):
# more and shorter k-tile chains for the decode sizes, where the chains, not the bytes, bound them.
WGMMA_W4_SPLITK = (
    WGMMA_MEDIUM_W4.replace(split_k=True),
    WGMMA_MEDIUM_W4.replace(tile_n=32, warp_n=32, split_k=True),
)
WGMMA_W4_LEVEL1 = (
    WGMMA_DECODE.replace(weights="frag4"),
    WGMMA_DECODE.replace(tile_n=64, warp_n=64, weights="frag4"),
)
WGMMA_LEVEL1 = (
    # prefill tile without cluster, ping-pong 64x128, a 16-token decode tile
    WGMMA_PREFILL.replace(cluster=(1, 1, 1)),
    KernelConfig("wgmma", "sm90a", 64, 128, 128, 64, 128, 0, group=128, schedule="pingpong", promotion="overlap"),
    WGMMA_DECODE.replace(tile_n=16, warp_n=16),
)
LEVEL2_TILES = [(16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128), (128, 64), (128, 128),
                (128, 256), (256, 128)]
LEVEL2_WARPS = [(16, 16), (16, 32), (32, 32), (32, 64), (64, 32), (64, 64)]
LEVEL2_TILE_K = (64, 128)
LEVEL2_STAGES = (3, 4, 6)

DEFAULT_GROUP = 128
DEFAULT_OUTLIERS = 128


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    n: int
    k: int


def _load_by_path(name: str, path):
    """A torch-free module of another package, loaded from its file so that package's
    __init__ (which imports torch) never runs: the generator must work in a bare build env."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_models_config():
    return _load_by_path("_atom_models_config", MODELS_CONFIG)


def outliers_for(k: int, group: int, requested: int) -> int:
    """atom_ops' outlier rule (atom_ops/rules.py), raising the generator's ConfigError."""
    rules = _load_by_path("_atom_ops_rules", FORMAT_RULES)
    try:
        return rules.choose_outliers(k, group, requested)
    except rules.FormatError as e:
        raise ConfigError(str(e)) from None


def model_shapes(model: str) -> list[Shape]:
    """(N, K) of every linear of a Llama model: a preset name or an HF config.json path."""
    mc = _load_models_config()
    if model.endswith(".json"):
        cfg = mc.LlamaConfig.from_json(model)
    elif model in mc.PRESETS:
        cfg = mc.PRESETS[model]
    else:
        raise ConfigError(f"unknown model {model!r}: give a preset ({', '.join(sorted(mc.PRESETS))}) "
                          "or a path to an HF config.json")
    return [Shape(model, layer, n, k) for layer, (n, k) in cfg.linear_shapes().items()]


class Manifest:
    def __init__(self, archs, shapes=()):
        self.archs = tuple(archs)
        for a in self.archs:
            arch_info(a)
        self.shapes = tuple(shapes)
        self._configs: dict[str, dict[str, KernelConfig]] = {a: {} for a in self.archs}
        self.culled: list[tuple[str, str]] = []

    def _cull(self, name: str, why: str) -> bool:
        self.culled.append((name, why))
        log.info("cull %s: %s", name, why)
        return False

    def append(self, cfg: KernelConfig, strict: bool = True) -> bool:
        """Add a config; True if added. Impossible configs raise (strict) or are culled."""
        if cfg.arch not in self._configs:
            arch_info(cfg.arch)  # unknown arch -> ConfigError
            return self._cull(cfg.name, f"arch {cfg.arch} not selected")
        try:
            cfg.validate()
        except ConfigError as e:
            if strict:
                raise
            return self._cull(cfg.name, str(e).split(": ", 1)[-1])
        if cfg.name in self._configs[cfg.arch]:
            return self._cull(cfg.name, "duplicate")
        if self.shapes and not any(self._runs(cfg, s) for s in self.shapes):
            return self._cull(cfg.name, "runs none of the model's shapes")
        self._configs[cfg.arch][cfg.name] = cfg
        log.debug("keep %s", cfg.name)
        return True

    @staticmethod
    def _runs(cfg: KernelConfig, s: Shape) -> bool:
        for group in (DEFAULT_GROUP, 64):
            try:
                o = outliers_for(s.k, group, DEFAULT_OUTLIERS)
            except ConfigError:
                continue
            if cfg.supports(s.k, group, o, s.n):
                return True
        return False

    def configs(self, arch: str | None = None) -> list[KernelConfig]:
        """Configs in a stable order (arch order, then name)."""
        archs = [arch] if arch else self.archs
        return [c for a in archs for c in sorted(self._configs[a].values(), key=lambda c: c.name)]

    def names(self) -> list[str]:
        return [c.name for c in self.configs()]

    def __len__(self) -> int:
        return sum(len(v) for v in self._configs.values())

    def coverage(self) -> list[tuple[Shape, int, int, list[str]]]:
        """For each model shape (default group 128 and the outlier rule): supporting kernels."""
        rows = []
        for s in self.shapes:
            o = outliers_for(s.k, DEFAULT_GROUP, DEFAULT_OUTLIERS)
            names = [c.name for c in self.configs() if c.supports(s.k, DEFAULT_GROUP, o, s.n)]
            rows.append((s, DEFAULT_GROUP, o, names))
        return rows


def level_configs(level: int) -> list[KernelConfig]:
    """Arch-less (arch='sm80' placeholder) configs of a level, f16 only; callers retarget."""
    if level < 0:
        raise ConfigError(f"--level must be >= 0, got {level}")
    cfgs = [LARGE, SMALL, STREAM, STREAM_M8, WGMMA_DECODE, WGMMA_MEDIUM, WGMMA_PREFILL, WGMMA_MEDIUM_W4, *WGMMA_W4_SPLITK]
    if level >= 1:
        cfgs += list(LEVEL1) + list(STREAM_LEVEL1) + list(WGMMA_LEVEL1) + list(WGMMA_W4_LEVEL1)
    if level >= 2:
        for (tm, tn), (wm, wn), tk, st in itertools.product(LEVEL2_TILES, LEVEL2_WARPS, LEVEL2_TILE_K,
                                                            LEVEL2_STAGES):
            cfgs.append(KernelConfig("mma", "sm80", tm, tn, tk, wm, wn, st, split_k=tm <= 32))
    return cfgs


def committed_table_kernels(arch: str, tables=TUNING_TABLES) -> list[KernelConfig]:
    """Every kernel the committed tuning tables (tuning/tables/*.json) pick for ``arch``. Built by
    default: atom_ops reads the current GPU's table at run time, and a choice that was not compiled
    falls back to the built-in dispatch (so without them a default build would not run the table)."""
    from .dispatch import load_tuning
    out = []
    for path in sorted(Path(tables).glob("*.json")):
        table = load_tuning(path)
        if arch in table:
            out += table[arch].kernels()
    return out


def default_manifest(archs, level: int = 0, shapes=(), dispatch=None) -> Manifest:
    """The manifest for ``archs``: level configs in every output dtype, plus every kernel the
    dispatch rules name (``dispatch``: {arch: ArchDispatch}; defaults when absent) and, without
    ``dispatch``, every kernel a committed tuning table picks for the arch."""
    from .dispatch import default_dispatch
    m = Manifest(archs, shapes)
    for arch in m.archs:
        info = ARCHS[arch]
        if dispatch and arch in dispatch:
            base = dispatch[arch].kernels() + [LARGE.replace(arch=arch)]   # chosen + safe fallback
            strict = True
        else:
            base = [c.replace(arch=arch) for c in level_configs(level) if c.family in info.families]
            base += default_dispatch(arch).kernels() + committed_table_kernels(arch)
            strict = level < 2
        for cfg in base:
            for dt in OUT_DTYPES:
                c = cfg.replace(out_dtype=dt)
                if c.name not in {x.name for x in m.configs(arch)}:
                    m.append(c, strict=strict)
    return m


# The int8 family (plain CUTLASS INT8 GEMM, the bench's ceiling; configs.Int8GemmConfig): one
# kernel per arch that has one. Known-good CUTLASS configurations: sm80 = CUTLASS's
# gemm_s8t_s8n_s32t_tensor_op_s32_sm80 unit test tile; sm90a = the one measured at ~1456 TOPS
# on our H100 (DESIGN.md).
INT8_DEFAULT = {
    "sm80": (Int8GemmConfig("sm80", 128, 256, 64, 64, 64, 3),),
    "sm90a": (Int8GemmConfig("sm90a", 128, 256, 128, cluster=(2, 1, 1), schedule="cooperative"),),
}


def int8_configs(arch: str) -> list[Int8GemmConfig]:
    """The int8 family's configs for ``arch`` (validated; none for sm86/sm89: the sm80 kernel's
    PTX-carrying code runs there when sm80 is built)."""
    out = []
    for c in INT8_DEFAULT.get(arch, ()):
        c.validate()
        out.append(c)
    return out
