"""Compile one generated kernel TU per arch family with nvcc (-c only; no GPU needed).

Objects are cached under build/nvcc-cache/ keyed by a hash of the generated sources, the
CUTLASS version, the flags and nvcc's version, so reruns with unchanged inputs take no time.
Skipped when nvcc or the nvidia-cutlass headers are missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from generator import default_manifest, emit

pytestmark = pytest.mark.nvcc

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "nvcc-cache"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None:
        return None
    d = Path(spec.submodule_search_locations[0]) / "source" / "include"
    return d if (d / "cutlass").is_dir() else None


CUTLASS = cutlass_include()


def nvcc_version() -> str:
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout


def compile_cached(src: Path, flags: list[str], key: str, check_ptxas) -> Path:
    """nvcc -c src into build/nvcc-cache/<key>.o unless it is there; check_ptxas(ptxas -v output)
    runs on a fresh compile (a cached object passed it before)."""
    obj = CACHE / f"{key}.o"
    if not obj.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_suffix(".o.tmp")
        r = subprocess.run(["nice", "-n", "10", NVCC, *flags, "-Xptxas", "-v", "-c", str(src), "-o", str(tmp)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        check_ptxas(r.stderr)
        tmp.replace(obj)
    return obj


# (arch, which kernel): the split-K small tile exercises every code path of the mma family;
# int8: the plain CUTLASS INT8 GEMM (2.x on sm80, 3.x TMA/wgmma on sm90a; ~10 s and ~50 s cold).
# wgmma: the sm90a family on CUTLASS's blockwise FP8 mainloop, its swap-AB decode tile (~55 s cold);
# wgmma_ovl: the overlapped-promotion mainloop (atom_wgmma_overlap.cuh), the level-0 prefill tile.
# stream: the mma family's decode kernel (atom_w4a4_stream.cuh), its 16-token tile (~5 s).
CASES = [("sm80", "mma"), ("sm90a", "mma"), ("sm80", "int8"), ("sm90a", "int8"), ("sm90a", "wgmma"),
         ("sm90a", "wgmma_ovl"), ("sm80", "stream"), ("sm90a", "stream")]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(CUTLASS is None, reason="nvidia-cutlass headers not found")
@pytest.mark.parametrize("arch, family", CASES)
def test_compile_one_kernel(arch, family, tmp_path):
    from generator.configs import ARCHS
    from generator.manifest import int8_configs
    out = tmp_path / "gen"
    m = default_manifest([arch])
    emit(m, out)
    if family == "int8":
        cfg = int8_configs(arch)[0]
    elif family == "wgmma":
        cfg = next(c for c in m.configs() if c.family == family and c.swap_ab and c.out_dtype == "bf16")
    elif family == "wgmma_ovl":
        cfg = next(c for c in m.configs() if c.promotion == "overlap" and c.out_dtype == "bf16")
    elif family == "stream":
        cfg = next(c for c in m.configs() if c.schedule == "stream" and c.tile_m == 16 and c.out_dtype == "bf16")
    else:
        cfg = next(c for c in m.configs() if c.family == family and c.split_k and c.out_dtype == "bf16")
    src = out / arch / f"{cfg.name}.cu"
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", *ARCHS[arch].gencode.split(),
             "-I", str(out / "include"), "-I", str(CUTLASS / ".." / "tools" / "util" / "include"),
             "-I", str(CUTLASS)]
    h = hashlib.sha256()
    for p in [src, *sorted((out / "include").iterdir())]:
        h.update(p.read_bytes())
    h.update(" ".join(flags[:-6]).encode())
    h.update(str(CUTLASS.parent.parent).encode() + nvcc_version().encode())
    def check(ptxas: str) -> None:
        assert "spill" not in ptxas or " 0 bytes spill stores" in ptxas, ptxas[-2000:]
        # C7510 / C7515: wgmma serialized; C7517: ptxas waited for in-flight wgmmas on its own (an
        # accumulator touched too early): the overlapped promotion would silently serialize again.
        assert not any(code in ptxas for code in ("C7510", "C7515", "C7517")), ptxas[-2000:]

    obj = compile_cached(src, flags, f"{cfg.name}-{h.hexdigest()[:16]}", check)
    assert obj.stat().st_size > 10_000
    syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
    assert f"launch_{cfg.name}" in syms and f"check_{cfg.name}" in syms
    if family in ("int8", "wgmma", "wgmma_ovl"):
        return  # CUTLASS's kernel templates over anonymous-namespace types: internal linkage already
    # The family's templates are instantiated with the same types in every arch's TUs: they
    # must have internal linkage (lower-case nm type), or the linker would merge sm80 and
    # sm90a code into one symbol (a real bug once: launches failed with "invalid argument").
    raw = subprocess.run(["nm", str(obj)], capture_output=True, text=True).stdout
    fam = [ln.split() for ln in raw.splitlines() if "mma_family" in ln and len(ln.split()) >= 3]
    exported = [name for _, kind, name in fam if kind not in "tbdr"]  # global, weak or GNU-unique
    assert fam and all(cfg.name in name for name in exported), exported[:10]


# The plain CUDA TUs built once for every arch (sources.cmake ATOM_MULTIARCH_SOURCES): compiled for
# sm80 and sm90a in one nvcc call, no CUTLASS (~20 s cold for attention.cu).
MULTIARCH_CASES = [("attention.cu", ("kv4_append", "kv4_decode_attention", "kv4_gather", "check_kv4_decode",
                                    "paged_decode_attention", "check_paged_decode", "kv4_prefill_attention",
                                    "check_kv4_prefill")),
                   ("quant_ops.cu", ("quantize_rows", "check_quantize", "stage_packed"))]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("tu, symbols", MULTIARCH_CASES)
def test_compile_multiarch_tu(tu, symbols, tmp_path):
    from generator.configs import ARCHS
    out = tmp_path / "gen"
    emit(default_manifest(["sm80"]), out)
    src = out / tu
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", *ARCHS["sm80"].gencode.split(),
             *ARCHS["sm90a"].gencode.split(), "-I", str(out / "include")]
    h = hashlib.sha256(src.read_bytes() + (out / "include" / "atom_w4a4_api.h").read_bytes())
    h.update(" ".join(flags[:-2]).encode() + nvcc_version().encode())
    def check(ptxas: str) -> None:  # every kernel's static smem fits 48 KiB; spills stay a few bytes at most
        smem = [int(x) for x in re.findall(r"(\d+) bytes smem", ptxas)]
        assert smem and max(smem) <= 48 * 1024, max(smem)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", ptxas)]
        assert max(spills, default=0) <= 16, ptxas[-2000:]

    obj = compile_cached(src, flags, f"{tu}-{h.hexdigest()[:16]}", check)
    syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
    for name in symbols:
        assert f"atom::{name}(" in syms, name
