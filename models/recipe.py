"""The Atom quantization recipe: every switch of the offline pipeline, and the ablation ladder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from atom_ops.formats import QuantSpec, choose_outliers

from .gptq import GPTQ_ORDERS

# group = 0 means one group spanning all normal channels (per-channel weights / per-token activations)
PER_CHANNEL = 0


@dataclass(frozen=True)
class Recipe:
    """Atom (MLSys'24) defaults; each switch can be turned off for the ablation."""

    w_bits: int = 4
    a_bits: int = 4                 # 16 = activations stay in floating point (weight-only)
    group: int = 128                # PER_CHANNEL (0) for no grouping
    outliers: int = 128             # requested INT8 outlier channels per layer (0 = none)
    reorder: bool = True            # channel reorder by calibration sum(x^2); needed for outliers
    act_clip: float = 0.9
    weight_clip: float = 0.85
    clip_search: bool = False       # per-layer search of the weight clip ratio (Hessian-weighted)
    gptq: bool = True
    gptq_block: int = 128
    gptq_damp: float = 0.01
    gptq_order: str = "ascending"   # walk the reordered layout as stored, or "descending" (outliers first)
    kv_bits: int = 4                # 16 = fp KV cache
    kv_group: int = 128             # asymmetric INT4 along head_dim; min(kv_group, head_dim)
    calib_samples: int = 16
    calib_seqlen: int = 2048

    def __post_init__(self):
        if self.w_bits not in (4, 8) or self.a_bits not in (4, 8, 16) or self.kv_bits not in (4, 16):
            raise ValueError(f"unsupported bit widths in {self}")
        if self.outliers and not self.reorder:
            raise ValueError("outlier channels need reorder=True (they are found by reordering)")
        if self.group not in (PER_CHANNEL, 32, 64, 128, 256):
            raise ValueError(f"group must be 0 (per channel), 32, 64, 128 or 256; got {self.group}")
        if self.gptq_order not in GPTQ_ORDERS:
            raise ValueError(f"gptq_order must be one of {GPTQ_ORDERS}, got {self.gptq_order!r}")
        for name in ("act_clip", "weight_clip"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")

    def spec_for(self, k: int) -> QuantSpec:
        """The layer's K split. Outliers follow formats.choose_outliers; per-channel mode puts
        everything that is not an outlier into one group."""
        if self.group == PER_CHANNEL:
            return QuantSpec(k, k - self.outliers, self.outliers)
        return QuantSpec(k, self.group, choose_outliers(k, self.group, self.outliers))

    @property
    def kernel_compatible(self) -> bool:
        """True when the W4A4 GEMM kernels can run this recipe (else only the reference can)."""
        return self.w_bits == 4 and self.a_bits == 4 and self.group in (64, 128)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(**d)


ATOM = Recipe()

# Atom's Table 4 ladder (each row adds one technique), plus W8A8 and W4A16 references.
_RTN = Recipe(group=PER_CHANNEL, outliers=0, reorder=False, act_clip=1.0, weight_clip=1.0,
              gptq=False, kv_bits=16)


def ablation_ladder(group: int = 128) -> list[tuple[str, Recipe | None]]:
    mixed = replace(_RTN, outliers=128, reorder=True)
    grouped = replace(mixed, group=group)
    clipped = replace(grouped, act_clip=0.9, weight_clip=0.85)
    gptq = replace(clipped, gptq=True)
    kv4 = replace(gptq, kv_bits=4)
    return [
        ("FP16", None),
        ("W4A4 RTN", _RTN),
        ("+ mixed precision (outliers)", mixed),
        (f"+ group quantization (g{group})", grouped),
        ("+ clipping", clipped),
        ("+ GPTQ", gptq),
        ("+ KV4 (= Atom)", kv4),
        ("W8A8 RTN (reference)", replace(_RTN, w_bits=8, a_bits=8)),
        (f"W4A16 GPTQ g{group} (reference)", replace(_RTN, a_bits=16, group=group, gptq=True,
                                                     reorder=True, weight_clip=0.85)),
    ]
