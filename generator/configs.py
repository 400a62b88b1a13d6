"""Kernel configurations: frozen dataclasses whose ``name`` is the only source of kernel names.

A ``KernelConfig`` describes one compiled kernel of one family for one arch. ``validate()``
raises ``ConfigError`` naming the kernel and the reason; ``KernelConfig.from_name`` parses a
name back (tuning tables store names), so ``from_name(cfg.name) == cfg`` for every config.

Families:
    mma    CUTLASS 2.x arch-level main loop (cp.async + ldmatrix + mma.sync INT4 m16n8k64 /
           INT8 m16n8k32), sm80 / sm86 / sm89, and built for sm90a as the portable fallback
           (INT4 mma is emulated on Hopper: on sm_90+ it runs as two INT8 mmas).
           Schedule "stream" (name suffix ``_stream``, templates/atom_w4a4_stream.cuh.j2) is the
           decode kernel of the family: swap-AB, 4-bit weights streamed through a per-warp
           cp.async ring into s8 x s8 mma fragments (16 x the nibbles, no offsets), the CTA's
           ``warps_k`` warps splitting K in contiguous ranges (``_kw<n>``). There tile_m = tokens
           per CTA (= warp_m), warp_n = weight rows per warp (16 or 32), tile_k = 128 (one 64-byte
           chunk per row), stages = chunks in flight per warp (shared memory, not registers).
    wgmma  the Hopper (sm90a) family: CUTLASS 3.x blockwise-scaling collective (TMA, scales,
           pipeline) with our mainloop (templates/atom_wgmma_overlap.cuh.j2) over the staged
           operands of atom_ops/staging.py: INT4 groups as e4m3 bytes on FP8 wgmma, the INT8
           outlier group as int8 bytes on s8 wgmma, each group's exact dot promoted into the
           float accumulator as the reference does (bit for bit), k-tile k-1's promotion
           overlapped with k-tile k's wgmmas. ``promotion="overlap"`` (name suffix ``_ovl``) is
           the only mainloop: CUTLASS's stock one cannot read the int8 block. Group 128 only;
           ``swap_ab`` puts the tokens on wgmma's N dimension for small M. tile_k counts staged
           (8-bit) columns. ``weights="frag4"`` (suffix ``_w4``, swap-AB only) reads the weights
           4 bits per INT4 value (atom_ops.staging.weight_fragments) into register-operand
           wgmmas: half the weight bytes, for the bandwidth-bound decode and medium tiles.
    int8   not a W4A4 kernel: the plain CUTLASS INT8 GEMM (no groups) that bench/gemm.py uses as
           the ceiling; its own ``Int8GemmConfig`` and ABI (bottom of this file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace


class ConfigError(ValueError):
    """An impossible or unsupported kernel configuration (the message names it)."""


@dataclass(frozen=True)
class ArchInfo:
    name: str
    cc: int                 # compute capability, major * 10 + minor
    smem_bytes: int         # max dynamic shared memory per block (opt-in)
    families: tuple[str, ...]
    gencode: str            # nvcc -gencode flags for this arch's sources
    max_cc: int             # highest compute capability the built code runs on

    @property
    def cmake_arch(self) -> str:
        return self.name[2:]


ARCHS: dict[str, ArchInfo] = {
    # sm80 code carries compute_80 PTX, so it also runs (JIT) on sm86/89/90/...
    "sm80": ArchInfo("sm80", 80, 166912, ("mma",),
                     "-gencode=arch=compute_80,code=[sm_80,compute_80]", 999),
    "sm86": ArchInfo("sm86", 86, 101376, ("mma",), "-gencode=arch=compute_86,code=sm_86", 89),
    "sm89": ArchInfo("sm89", 89, 101376, ("mma",), "-gencode=arch=compute_89,code=sm_89", 89),
    # sm90a: arch-specific code, runs on cc 9.0 only. Until the Hopper family lands the
    # mma family is built here as the (emulated-INT4) fallback.
    "sm90a": ArchInfo("sm90a", 90, 232448, ("mma", "wgmma"),
                      "-gencode=arch=compute_90a,code=sm_90a", 90),
}

FAMILIES = ("mma", "wgmma")
IMPLEMENTED_FAMILIES = ("mma", "wgmma")
OUT_DTYPES = {"f16": "__half", "bf16": "__nv_bfloat16"}      # name part -> C++ type
OUT_DTYPE_ENUM = {"f16": "atom::OutDtype::kF16", "bf16": "atom::OutDtype::kBF16"}
SCHEDULES = {"mma": ("multistage", "stream"), "wgmma": ("cooperative", "pingpong")}
# wgmma mainloop: "overlap" = templates/atom_wgmma_overlap.cuh.j2 (two temporary accumulators:
# k-tile k-1 is promoted while k-tile k's wgmmas run; INT8 outlier k-tiles), name suffix _ovl,
# the wgmma family's only one. "stock" (CUTLASS's blockwise mainloop, no suffix) is what every
# other family is (the field does not apply to them).
PROMOTIONS = ("stock", "overlap")
# wgmma weight operand: "staged" = e4m3 / int8 bytes through TMA (SS wgmma); "frag4" = 4 bits per
# INT4 value in register-fragment order (atom_ops.staging.weight_fragments), RS wgmma (_w4)
WEIGHTS = ("staged", "frag4")
MAX_ACCUMULATOR_REGS = 128  # int32 + float accumulators per thread (mma family)
# stream schedule: estimated registers per thread (KernelConfig.stream_regs: the current chunk,
# its mma fragments, int32 + float accumulators, copy pointers); beyond this ptxas spills (the
# level-1 64-token tile, estimated 212, compiles to 176-184 without spills, ptxas -v).
MAX_STREAM_REGS = 224
STREAM_CHUNK_K = 128      # INT4 values per row per chunk (64 bytes)


def arch_info(arch: str) -> ArchInfo:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ConfigError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}") from None


@dataclass(frozen=True, order=True)
class KernelConfig:
    """One W4A4 GEMM kernel. ``group``/``outliers`` None = run-time values (any supported)."""

    family: str
    arch: str
    tile_m: int
    tile_n: int
    tile_k: int             # in INT4 elements (tile_k / 2 bytes per row per stage)
    warp_m: int
    warp_n: int
    stages: int
    out_dtype: str = "f16"
    split_k: bool = False   # built with the split-K (float workspace) epilogue
    group: int | None = None
    outliers: int | None = None
    cluster: tuple[int, int, int] = (1, 1, 1)
    schedule: str = "multistage"
    swap_ab: bool = False   # wgmma: GEMM A = weights, B = tokens (small M on wgmma's N)
    promotion: str = "stock"  # wgmma: must be "overlap" (our mainloop, _ovl); other families: "stock"
    warps_k: int = 1        # mma "stream": warps of a CTA splitting K (_kw<n>)
    weights: str = "staged"  # wgmma swap-AB: "frag4" = 4-bit weight fragments, RS wgmma (_w4)

    # ------------------------------------------------------------------ naming
    @property
    def name(self) -> str:
        parts = [f"atom_w4a4_{self.family}_{self.arch}",
                 f"t{self.tile_m}x{self.tile_n}x{self.tile_k}",
                 f"w{self.warp_m}x{self.warp_n}",
                 f"s{self.stages}" if self.stages else "sauto"]
        if self.warps_k != 1:
            parts.append(f"kw{self.warps_k}")
        if self.cluster != (1, 1, 1):
            parts.append("c" + "x".join(map(str, self.cluster)))
        if self.schedule != SCHEDULES.get(self.family, ("",))[0]:
            parts.append(self.schedule)
        if self.swap_ab:
            parts.append("swap")
        if self.promotion != PROMOTIONS[0]:
            parts.append("ovl")
        if self.weights != WEIGHTS[0]:
            parts.append("w4")
        if self.split_k:
            parts.append("sk")
        parts.append(f"g{self.group if self.group is not None else 'any'}")
        parts.append(f"o{self.outliers if self.outliers is not None else 'any'}")
        parts.append(self.out_dtype)
        return "_".join(parts)

    _NAME_RE = re.compile(
        r"^atom_w4a4_(?P<family>[a-z0-9]+)_(?P<arch>sm\d+a?)_t(?P<tm>\d+)x(?P<tn>\d+)x(?P<tk>\d+)"
        r"_w(?P<wm>\d+)x(?P<wn>\d+)_s(?P<st>\d+|auto)(?:_kw(?P<kw>\d+))?(?:_c(?P<cl>\d+x\d+x\d+))?(?:_(?P<sched>cooperative|pingpong|stream))?"
        r"(?P<swap>_swap)?(?P<ovl>_ovl)?(?P<w4>_w4)?(?P<sk>_sk)?_g(?P<g>\d+|any)_o(?P<o>\d+|any)_(?P<dt>f16|bf16)$")

    @classmethod
    def from_name(cls, name: str) -> "KernelConfig":
        m = cls._NAME_RE.match(name)
        if not m:
            raise ConfigError(f"not a kernel name: {name!r}")
        d = m.groupdict()
        fam = d["family"]
        return cls(family=fam, arch=d["arch"], tile_m=int(d["tm"]), tile_n=int(d["tn"]),
                   tile_k=int(d["tk"]), warp_m=int(d["wm"]), warp_n=int(d["wn"]), stages=0 if d["st"] == "auto" else int(d["st"]),
                   out_dtype=d["dt"], split_k=bool(d["sk"]),
                   group=None if d["g"] == "any" else int(d["g"]),
                   outliers=None if d["o"] == "any" else int(d["o"]),
                   cluster=tuple(int(x) for x in d["cl"].split("x")) if d["cl"] else (1, 1, 1),
                   schedule=d["sched"] or SCHEDULES.get(fam, ("multistage",))[0],
                   swap_ab=bool(d["swap"]), promotion="overlap" if d["ovl"] else PROMOTIONS[0],
                   warps_k=int(d["kw"]) if d["kw"] else 1, weights="frag4" if d["w4"] else WEIGHTS[0])

    def replace(self, **kw) -> "KernelConfig":
        return replace(self, **kw)

    # -------------------------------------------------------------- derived
    @property
    def threads(self) -> int:
        if self.family == "wgmma":
            return 384  # one producer + two consumer warp groups (both schedules)
        return (self.tile_m // self.warp_m) * (self.tile_n // self.warp_n) * self.warps_k * 32

    @property
    def smem_bytes(self) -> int:
        """Shared memory: mma = padded INT4 byte tiles per stage; wgmma = FP8 A/B tiles plus
        the per-row/column float scales per stage, plus a reserve for the TMA epilogue."""
        if self.family == "wgmma":  # stages = 0: the builder fills shared memory (one stage here)
            per_stage = (self.tile_m + self.tile_n) * (self.tile_k + 4) + 32
            return max(self.stages, 1) * per_stage + WGMMA_EPILOGUE_SMEM
        if self.schedule == "stream":  # reduction buffer + per-warp chunk rings (+ the scales, by K)
            slots = 2 * (self.warp_n // 16) + self.tile_m // 8
            return self.warps_k * self.tile_m * (self.tile_n + 4) * 4 + self.threads * self.stages * slots * 16
        return self.stages * (self.tile_m + self.tile_n) * (self.tile_k // 2 + 16)

    @property
    def accumulator_regs(self) -> int:
        """int32 + float (mma) or float temporary + float (wgmma; overlap: two temporaries)
        accumulators per thread."""
        threads = 128 if self.family == "wgmma" else 32
        copies = 3 if self.promotion == "overlap" else 2
        return copies * self.warp_m * self.warp_n // threads

    @property
    def stream_regs(self) -> int:
        """stream schedule: estimated registers per thread: the current chunk's words and one
        k-step's mma fragments (2 x (8 per 16-row tile + 4 per 8-token tile)), the int32
        accumulators (carried and per-chunk, two sets for tiles of <= 2 mma tiles) and the float
        ones, the copy pointers, ~20 scalars. The chunks in flight live in shared memory, so
        stages cost none. Matches ptxas within ~10% on the built tiles (64-71 for 16 rows x 8
        tokens, 80 for x 16, 110-124 for 32 rows x 8 tokens, 112-126 for x 32 tokens)."""
        rt, nt = self.warp_n // 16, self.tile_m // 8
        sets = 2 if rt * nt <= 2 else 1
        return 20 + 2 * (8 * rt + 4 * nt) + 8 * rt * nt * sets + 4 * rt * nt + 2 * (2 * rt + nt)

    @property
    def cxx_out(self) -> str:
        return OUT_DTYPES[self.out_dtype]

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError if this kernel cannot be built or cannot run."""
        def bad(why: str):
            raise ConfigError(f"{self.name}: {why}")

        info = arch_info(self.arch)
        if self.family not in FAMILIES:
            bad(f"unknown family {self.family!r}; known: {FAMILIES}")
        if self.family not in info.families:
            bad(f"family {self.family!r} does not run on {self.arch} (families there: {info.families})")
        if self.family not in IMPLEMENTED_FAMILIES:
            bad(f"family {self.family!r} is not implemented yet (the Hopper issue adds it)")
        if self.out_dtype not in OUT_DTYPES:
            bad(f"out_dtype must be one of {tuple(OUT_DTYPES)}")
        if self.schedule not in SCHEDULES[self.family]:
            bad(f"schedule {self.schedule!r} not in {SCHEDULES[self.family]} for family {self.family}")
        if self.promotion not in PROMOTIONS:
            bad(f"promotion {self.promotion!r} not in {PROMOTIONS}")
        if self.promotion != PROMOTIONS[0] and self.family != "wgmma":
            bad(f"promotion {self.promotion!r} exists only in the wgmma family")
        if self.weights not in WEIGHTS:
            bad(f"weights {self.weights!r} not in {WEIGHTS}")
        if self.weights != WEIGHTS[0] and self.family != "wgmma":
            bad(f"weights {self.weights!r} exists only in the wgmma family")
        FAMILY_CHECKS[self.family](self, info, bad)

    def supports(self, k: int, group: int, outliers: int, n: int) -> bool:
        """Whether this kernel runs a layer with these run-time values."""
        if self.family == "wgmma":
            return (group == WGMMA_GROUP and n % (self.tile_m if self.weights == "frag4" else 8) == 0
                    and outliers <= WGMMA_GROUP and k - outliers > 0 and (k - outliers) % group == 0)
        if n % 16 or group % self.tile_k or outliers % (self.tile_k // 2):
            return False
        if self.group is not None and group != self.group:
            return False
        if self.outliers is not None and outliers != self.outliers:
            return False
        return k - outliers > 0 and (k - outliers) % group == 0


def _check_mma(self: KernelConfig, info: ArchInfo, bad) -> None:
    """Limits of the mma family (templates/atom_w4a4_mma.cuh.j2)."""
    if self.cluster != (1, 1, 1):
        bad("the mma family has no thread-block clusters (cluster must be 1x1x1)")
    if self.swap_ab:
        bad("the mma family has no swap-AB flag (its stream schedule is swap-AB by design)")
    if self.schedule == "stream":
        return _check_stream(self, info, bad)
    if self.warps_k != 1:
        bad("warps_k > 1 exists only in the stream schedule")
    for what, v in (("tile_m", self.tile_m), ("tile_n", self.tile_n), ("tile_k", self.tile_k),
                    ("warp_m", self.warp_m), ("warp_n", self.warp_n)):
        if v <= 0:
            bad(f"{what} must be positive")
    if self.tile_k % 64:
        bad(f"tile_k={self.tile_k} must be a multiple of 64 (one INT4 mma k-step)")
    if self.warp_m % 16 or self.warp_n % 16:
        bad(f"warp tile {self.warp_m}x{self.warp_n} must be a multiple of 16x16")
    if self.tile_m % self.warp_m or self.tile_n % self.warp_n:
        bad(f"tile {self.tile_m}x{self.tile_n} is not a multiple of the warp tile "
            f"{self.warp_m}x{self.warp_n}")
    if not 32 <= self.threads <= 1024:
        bad(f"{self.threads} threads per block (must be 32..1024)")
    if not 2 <= self.stages <= 8:
        bad(f"stages={self.stages} (must be 2..8)")
    if self.group is not None and (self.group <= 0 or self.group % self.tile_k):
        bad(f"group={self.group} must be a positive multiple of tile_k={self.tile_k}")
    if self.outliers is not None and (self.outliers < 0 or self.outliers % (self.tile_k // 2)):
        bad(f"outliers={self.outliers} must be a multiple of tile_k/2={self.tile_k // 2}")
    if self.accumulator_regs > MAX_ACCUMULATOR_REGS:
        bad(f"warp tile {self.warp_m}x{self.warp_n} needs {self.accumulator_regs} accumulator "
            f"registers per thread (int32 + float), more than {MAX_ACCUMULATOR_REGS}")
    if self.smem_bytes > info.smem_bytes:
        bad(f"needs {self.smem_bytes} B of shared memory, {self.arch} allows {info.smem_bytes} B")


def _check_stream(self: KernelConfig, info: ArchInfo, bad) -> None:
    """Limits of the mma family's stream schedule (templates/atom_w4a4_stream.cuh.j2)."""
    if self.tile_k != STREAM_CHUNK_K:
        bad(f"tile_k must be {STREAM_CHUNK_K} (one 64-byte chunk per row)")
    if self.tile_m % 8 or not 8 <= self.tile_m <= 64:
        bad(f"tile_m={self.tile_m} (tokens per CTA) must be a multiple of 8 in 8..64")
    if self.warp_m != self.tile_m:
        bad("warp_m must equal tile_m (every warp covers all the CTA's tokens)")
    if self.warp_n not in (16, 32) or self.tile_n % self.warp_n:
        bad(f"warp_n must be 16 or 32 rows and divide tile_n={self.tile_n}")
    if not 2 <= self.stages <= 16:
        bad(f"stages={self.stages} (chunks in flight per warp) must be 2..16")
    if not 1 <= self.warps_k <= 8:
        bad(f"warps_k={self.warps_k} must be 1..8")
    if not 32 <= self.threads <= 512:
        bad(f"{self.threads} threads per block (must be 32..512)")
    if self.group is not None and (self.group <= 0 or self.group % STREAM_CHUNK_K):
        bad(f"group={self.group} must be a positive multiple of {STREAM_CHUNK_K}")
    if self.outliers is not None and (self.outliers < 0 or self.outliers % (STREAM_CHUNK_K // 2)):
        bad(f"outliers={self.outliers} must be a multiple of {STREAM_CHUNK_K // 2}")
    if self.stream_regs > MAX_STREAM_REGS:
        bad(f"needs about {self.stream_regs} registers per thread (chunk, fragments, accumulators), "
            f"more than {MAX_STREAM_REGS}")
    if self.smem_bytes > info.smem_bytes * 3 // 4:
        bad(f"reduction buffer and chunk rings take {self.smem_bytes} B: too little shared memory left "
            f"for the activation scales ({self.arch} allows {info.smem_bytes} B)")


WGMMA_GROUP = 128             # the blockwise mainloop promotes once per 128-column k-tile
WGMMA_EPILOGUE_SMEM = 32768   # reserve for the TMA epilogue's C/D staging buffers
# Overlap: float accumulator + two temporaries. A consumer warp group gets 232 registers
# (setmaxnreg); 64x128 (192) compiles without spills (ptxas -v, README), more would not fit.
MAX_WGMMA_OVERLAP_ACCUMULATOR_REGS = 192


def _check_wgmma(self: KernelConfig, info: ArchInfo, bad) -> None:
    """Limits of the wgmma family (templates/kernel_wgmma.cu.j2, CUTLASS's blockwise FP8 mainloop)."""
    if self.arch != "sm90a":
        bad("the wgmma family is built for sm90a only")
    if self.promotion != "overlap":
        bad("the wgmma family runs only its own mainloop, promotion='overlap' (CUTLASS's stock "
            "blockwise mainloop cannot read the staged INT8 outlier block)")
    if self.group != WGMMA_GROUP:
        bad(f"the wgmma family needs group={WGMMA_GROUP} (one promotion per 128-column k-tile)")
    if self.outliers is not None:
        bad("the wgmma family takes the outlier count at run time (outliers must be None)")
    if self.split_k and (self.weights != "frag4" or self.schedule != "cooperative"):
        bad("wgmma split-K exists only for the 4-bit weight fragment tiles (weights='frag4') of the "
            "cooperative schedule (CUTLASS's stream-K scheduler; the mainloop learns its first k-tile "
            "from the fragments' k-tile records)")
    if self.tile_k != WGMMA_GROUP:
        bad(f"tile_k must be {WGMMA_GROUP} (the blockwise mainloop promotes once per k-tile)")
    if self.tile_m not in (64, 128) or self.tile_n % 16 or not 16 <= self.tile_n <= 256:
        bad("wgmma tile: tile_m 64 or 128, tile_n a multiple of 16 in 16..256")
    want = (self.tile_m // 2 if self.schedule == "cooperative" else self.tile_m, self.tile_n)
    if self.schedule == "cooperative" and self.tile_m < 128:
        bad("the cooperative schedule needs tile_m = 128 (two consumer warp groups of 64 rows)")
    if (self.warp_m, self.warp_n) != want:
        bad(f"warp tile must be one consumer warp group's tile {want[0]}x{want[1]} for {self.schedule}")
    if self.accumulator_regs > MAX_WGMMA_OVERLAP_ACCUMULATOR_REGS:
        bad(f"warp group tile {self.warp_m}x{self.warp_n} needs {self.accumulator_regs} accumulator "
            f"registers per thread (two float temporaries + float), more than {MAX_WGMMA_OVERLAP_ACCUMULATOR_REGS}")
    if self.stages != 0:
        bad("stages must be 0 (auto: CUTLASS's blockwise builder sizes the pipeline to the shared memory)")
    if self.weights == "frag4" and (not self.swap_ab or self.cluster != (1, 1, 1)):
        bad("4-bit weight fragments (weights='frag4') need swap_ab (weights = wgmma's register "
            "operand A) and no cluster")
    if self.weights == "frag4" and (self.warp_m != 64 or not 32 <= self.tile_n <= 64):
        bad("4-bit weight fragments: one 64-row block per warp group (warp_m 64) and 32..64 tokens "
            "(below 32 CUTLASS loads the scales by TMA, which the fragment producer does not issue; "
            "above 64 the two fragment sets spill)")
    if self.cluster[2] != 1 or self.cluster[0] * self.cluster[1] > 2:
        bad(f"cluster {self.cluster}: at most 2 CTAs, cluster_k = 1")
    if self.smem_bytes > info.smem_bytes:
        bad(f"needs about {self.smem_bytes} B of shared memory, {self.arch} allows {info.smem_bytes} B")


# Family-specific validation, called by KernelConfig.validate after the common checks.
FAMILY_CHECKS = {"mma": _check_mma, "wgmma": _check_wgmma}


# --------------------------------------------------------------------------- int8 family
# The "int8" family is not a W4A4 kernel: it is the plain CUTLASS INT8 GEMM (no groups, no
# outliers, no scales) that the GEMM bench uses as the ceiling our groups cost against.
#     out[M, N] (int32) = a[M, K] (int8, row-major) . b[N, K]^T (int8, row-major = K x N column-major)
# exact int32 accumulation, LinearCombination epilogue with alpha = 1, beta = 0 (no C read).
# It has its own small ABI (Int8GemmArgs in atom_w4a4_api.h) and kernel table, so the W4A4
# dispatch, the torch op and the W4A4 tests never see it.
#   sm80:  CUTLASS 2.x device::Gemm, OpClassTensorOp Sm80, mma.sync m16n8k32 s8, multistage
#          (PTX-carrying: also runs on sm86/89/90).
#   sm90a: CUTLASS 3.x GemmUniversalAdapter, collective builders, TMA + wgmma, warp-specialized
#          cooperative or ping-pong, thread-block cluster.
INT8_SCHEDULES = {"sm80": ("multistage",), "sm90a": ("cooperative", "pingpong")}
INT8_ALIGN = 16  # K % 16 == 0 and N % 16 == 0 (16-byte rows of A/B for cp.async / TMA, 4 int32 per output vector)


@dataclass(frozen=True, order=True)
class Int8GemmConfig:
    """One plain INT8 GEMM (the bench's ceiling). tile_k counts INT8 elements."""

    arch: str
    tile_m: int
    tile_n: int
    tile_k: int
    warp_m: int = 0         # sm80 only (warp tile); 0 for sm90a
    warp_n: int = 0
    stages: int = 0         # sm80: pipeline stages; sm90a: 0 = StageCountAutoCarveout
    cluster: tuple[int, int, int] = (1, 1, 1)
    schedule: str = "multistage"
    family: str = "int8"
    out_dtype: str = "i32"

    @property
    def name(self) -> str:
        parts = [f"atom_int8_gemm_{self.arch}", f"t{self.tile_m}x{self.tile_n}x{self.tile_k}"]
        if self.warp_m:
            parts.append(f"w{self.warp_m}x{self.warp_n}")
        parts.append(f"s{self.stages}" if self.stages else "sauto")
        if self.cluster != (1, 1, 1):
            parts.append("c" + "x".join(map(str, self.cluster)))
        if self.schedule != "multistage":
            parts.append(self.schedule)
        parts.append(self.out_dtype)
        return "_".join(parts)

    def replace(self, **kw) -> "Int8GemmConfig":
        return replace(self, **kw)

    @property
    def threads(self) -> int:
        if self.arch == "sm90a":
            return 384  # one producer + two consumer warp groups (both schedules)
        return (self.tile_m // self.warp_m) * (self.tile_n // self.warp_n) * 32

    @property
    def smem_bytes(self) -> int:
        """sm80: the multistage A/B tiles (the 3.x builder sizes its own stages)."""
        return self.stages * (self.tile_m + self.tile_n) * self.tile_k

    def validate(self) -> None:
        def bad(why: str):
            raise ConfigError(f"{self.name}: {why}")

        info = arch_info(self.arch)
        if self.arch not in INT8_SCHEDULES:
            bad(f"the int8 family is built for {tuple(INT8_SCHEDULES)} only (sm80 code also runs on sm86/89/90)")
        if self.out_dtype != "i32":
            bad("the int8 family writes int32 only")
        if self.schedule not in INT8_SCHEDULES[self.arch]:
            bad(f"schedule {self.schedule!r} not in {INT8_SCHEDULES[self.arch]} for {self.arch}")
        if self.arch == "sm80":
            if self.cluster != (1, 1, 1):
                bad("sm80 has no thread-block clusters")
            if not self.warp_m or self.tile_m % self.warp_m or self.tile_n % self.warp_n:
                bad("tile must be a multiple of the warp tile")
            if self.warp_m % 16 or self.warp_n % 8 or self.tile_k % 32:
                bad("warp tile must be a multiple of 16x8 and tile_k of 32 (mma m16n8k32)")
            if not 32 <= self.threads <= 1024:
                bad(f"{self.threads} threads per block")
            if not 2 <= self.stages <= 8:
                bad(f"stages={self.stages} (must be 2..8)")
            if self.smem_bytes > info.smem_bytes:
                bad(f"needs {self.smem_bytes} B of shared memory, {self.arch} allows {info.smem_bytes} B")
        else:
            if self.warp_m or self.warp_n:
                bad("sm90a kernels have no warp tile (warp_m = warp_n = 0)")
            if self.tile_m not in (64, 128, 256) or self.tile_n % 16 or not 16 <= self.tile_n <= 256:
                bad("wgmma tile: tile_m in 64/128/256, tile_n a multiple of 16 up to 256")
            if self.schedule == "cooperative" and self.tile_m < 128:
                bad("the cooperative schedule needs tile_m >= 128")
            if self.tile_k % 32:
                bad("tile_k must be a multiple of 32 (wgmma k32 for int8)")
            if self.cluster[2] != 1 or self.cluster[0] * self.cluster[1] > 4:
                bad(f"cluster {self.cluster}: at most 4 CTAs, cluster_k = 1")
