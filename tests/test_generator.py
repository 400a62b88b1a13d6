"""CPU tests of the kernel generator: configs, names, manifest, dispatch, rendering, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from generator import ConfigError, KernelConfig, Manifest, default_manifest, emit, write_if_changed
from generator.cli import main as cli_main
from generator.configs import ARCHS
from generator.dispatch import DispatchRule, check_rules, default_dispatch, load_tuning
from generator.manifest import (LARGE, SMALL, STREAM, STREAM_M8, WGMMA_DECODE, WGMMA_MEDIUM, WGMMA_MEDIUM_W4, WGMMA_PREFILL, WGMMA_W4_SPLITK, level_configs,
                                committed_table_kernels, model_shapes, outliers_for)

REPO = Path(__file__).resolve().parent.parent
BUILD_ARCHS = ("sm80", "sm86", "sm89", "sm90a")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- configs

def test_names_unique_deterministic_and_roundtrip():
    m = default_manifest(BUILD_ARCHS, level=2)
    names = m.names()
    assert len(names) == len(set(names)) > 50
    assert names == default_manifest(BUILD_ARCHS, level=2).names()
    for c in m.configs():
        assert KernelConfig.from_name(c.name) == c
        assert c.name.isidentifier()  # used as a C++ symbol and a file name


def test_name_spells_every_parameter():
    c = LARGE.replace(arch="sm89", group=128, outliers=128, out_dtype="bf16")
    assert c.name == "atom_w4a4_mma_sm89_t128x128x64_w64x32_s4_g128_o128_bf16"
    assert SMALL.name == "atom_w4a4_mma_sm80_t16x64x64_w16x16_s6_sk_gany_oany_f16"
    variants = {LARGE.replace(**kw).name for kw in (
        {}, {"stages": 3}, {"tile_m": 64}, {"warp_n": 16}, {"split_k": True}, {"group": 64},
        {"outliers": 0}, {"out_dtype": "bf16"}, {"arch": "sm86"}, {"tile_k": 128})}
    assert len(variants) == 10


@pytest.mark.parametrize("kw, why", [
    ({"tile_m": 100}, "multiple of the warp tile"),
    ({"warp_m": 24, "tile_m": 48}, "multiple of 16x16"),
    ({"tile_k": 96}, "multiple of 64"),
    ({"group": 96}, "group=96"),
    ({"outliers": 48}, "outliers=48"),
    ({"stages": 1}, "stages=1"),
    ({"warp_m": 64, "warp_n": 64}, "accumulator"),
    ({"tile_m": 256, "tile_n": 256, "stages": 8, "tile_k": 128}, "shared memory"),
    ({"arch": "sm75"}, "unknown arch"),
    ({"family": "wgmma", "arch": "sm80"}, "does not run on sm80"),
    ({"out_dtype": "f32"}, "out_dtype"),
    ({"cluster": (2, 1, 1)}, "cluster"),
])
def test_impossible_configs_raise(kw, why):
    with pytest.raises(ConfigError, match=why):
        LARGE.replace(**kw).validate()


@pytest.mark.parametrize("kw, why", [
    ({"group": 64}, "group=128"),
    ({"group": None}, "group=128"),
    ({"outliers": 128}, "outliers must be None"),
    ({"split_k": True}, "split-K exists only for the 4-bit weight fragment tiles"),
    ({"tile_k": 256}, "tile_k must be 128"),
    ({"tile_m": 256}, "tile_m 64 or 128"),
    ({"tile_m": 64, "warp_m": 32}, "cooperative schedule needs tile_m = 128"),
    ({"warp_m": 128}, "warp tile must be one consumer warp group"),
    ({"tile_n": 256, "warp_n": 256}, "accumulator"),
    ({"stages": 4}, "stages must be 0"),
    ({"cluster": (2, 2, 1)}, "at most 2 CTAs"),
    ({"arch": "sm89"}, "does not run on sm89"),
    ({"schedule": "multistage"}, "schedule"),
])
def test_impossible_wgmma_configs_raise(kw, why):
    with pytest.raises(ConfigError, match=why):
        WGMMA_PREFILL.replace(**kw).validate()


def test_stream_schedule_naming_rules_and_render(tmp_path):
    s90 = STREAM.replace(arch="sm90a")
    assert s90.name == "atom_w4a4_mma_sm90a_t16x32x128_w16x16_s4_kw4_stream_gany_oany_f16"
    assert STREAM_M8.name == "atom_w4a4_mma_sm80_t8x32x128_w8x16_s3_kw4_stream_gany_oany_f16"
    sk = s90.replace(split_k=True, out_dtype="bf16", warps_k=1)
    assert sk.name == "atom_w4a4_mma_sm90a_t16x32x128_w16x16_s4_stream_sk_gany_oany_bf16"
    for c in (s90, sk, STREAM_M8):
        c.validate()
        assert KernelConfig.from_name(c.name) == c
    assert s90.threads == 256  # 2 row warps x 4 K warps
    # 64-byte chunks: group % 128, outliers % 64, N % 16.
    assert s90.supports(4096, 128, 128, 4096) and s90.supports(576, 128, 64, 64) and s90.supports(4096, 256, 0, 16)
    assert not s90.supports(4096, 64, 128, 4096) and not s90.supports(4096, 128, 32, 4096)
    assert not s90.supports(4096, 128, 128, 4104)
    # Every arch's shared memory holds the built-in stream tiles.
    for arch in ("sm80", "sm86", "sm89", "sm90a"):
        for c in level_configs(1):
            if c.schedule == "stream":
                c.replace(arch=arch).validate()
    out = tmp_path / "gen"
    emit(default_manifest(["sm90a"]), out)
    src = (out / "sm90a" / f"{s90.name}.cu").read_text()
    assert "atom::mma_family::StreamTraits<16, 16, 2, 4, 4, __half, false>" in src
    assert "mma_family::stream_check<KT>(p)" in src and "mma_family::stream_launch<KT>(p, stream)" in src
    assert "s8 x s8 mma" in (out / "include" / "atom_w4a4_stream.cuh").read_text()
    reg = (out / "sm90a" / "registry.cpp").read_text()
    assert f'if (M <= 8) return {{"{STREAM_M8.replace(arch="sm90a").name}", 1}};' in reg


@pytest.mark.parametrize("kw, why", [
    ({"tile_k": 64}, "tile_k must be 128"),
    ({"tile_m": 72, "warp_m": 72}, "multiple of 8 in 8..64"),
    ({"warp_m": 8}, "warp_m must equal tile_m"),
    ({"warp_n": 64, "tile_n": 64}, "warp_n must be 16 or 32"),
    ({"stages": 1}, "stages=1"),
    ({"warps_k": 9}, "warps_k=9"),
    ({"group": 64}, "multiple of 128"),
    ({"outliers": 32}, "multiple of 64"),
    ({"tile_m": 64, "warp_m": 64, "warp_n": 32, "tile_n": 64, "stages": 8}, "registers"),
    ({"stages": 16}, "shared memory"),
    ({"swap_ab": True}, "swap-AB"),
])
def test_impossible_stream_configs_raise(kw, why):
    with pytest.raises(ConfigError, match=why):
        STREAM.replace(**kw).validate()


def test_warps_k_only_in_the_stream_schedule():
    with pytest.raises(ConfigError, match="warps_k > 1 exists only in the stream schedule"):
        SMALL.replace(warps_k=2).validate()


def test_wgmma_family_names_manifest_and_dispatch(tmp_path):
    for cfg in (WGMMA_DECODE, WGMMA_MEDIUM, WGMMA_PREFILL):
        cfg.validate()
        assert KernelConfig.from_name(cfg.name) == cfg
    assert WGMMA_DECODE.name == "atom_w4a4_wgmma_sm90a_t64x32x128_w64x32_sauto_pingpong_swap_ovl_g128_oany_f16"
    assert WGMMA_PREFILL.name == "atom_w4a4_wgmma_sm90a_t128x128x128_w64x128_sauto_c1x2x1_ovl_g128_oany_f16"
    # Group 128 only; any outlier count the format allows; N % 8.
    assert WGMMA_PREFILL.supports(4096, 128, 128, 4104) and WGMMA_PREFILL.supports(576, 128, 64, 64)
    assert not WGMMA_PREFILL.supports(4096, 64, 128, 4096) and not WGMMA_PREFILL.supports(4096, 128, 128, 4100)
    m = default_manifest(["sm90a"])
    tuned = {c.name for c in committed_table_kernels("sm90a")}  # the committed H100 table's picks
    level0 = {c.replace(arch="sm90a").name for c in level_configs(0)} | {c.name for c in default_dispatch("sm90a").kernels()}
    fams = sorted(c.family for c in m.configs() if c.name in level0)
    # + the 4-bit weight fragment medium tile; the mma family: multistage fallback for group 64
    # and the stream decode kernels
    assert fams.count("wgmma") == 6 and fams.count("mma") == 4
    assert WGMMA_MEDIUM_W4.name == "atom_w4a4_wgmma_sm90a_t128x64x128_w64x64_sauto_swap_ovl_w4_g128_oany_f16"
    assert KernelConfig.from_name(WGMMA_MEDIUM_W4.name) == WGMMA_MEDIUM_W4
    # ... and every kernel the table picks, in both output dtypes: a default build runs its choices
    assert {c.name for c in m.configs() if c.out_dtype == "f16"} == level0 | tuned
    assert any(c.family == "mma" and c.schedule == "stream" for c in committed_table_kernels("sm90a"))
    d = default_dispatch("sm90a")
    assert [r.kernel for r in d.rules] == [STREAM_M8.replace(arch="sm90a"), STREAM.replace(arch="sm90a"),
                                           WGMMA_DECODE, WGMMA_MEDIUM, WGMMA_PREFILL]
    out = tmp_path / "gen"
    emit(m, out)
    src = (out / "sm90a" / f"{WGMMA_DECODE.name}.cu").read_text()
    assert "KernelTmaWarpSpecializedPingpongFP8Blockwise" in src and "Swap-AB" in src
    assert "cutlass::layout::ColumnMajor;" in src  # D = y^T column-major
    pre = (out / "sm90a" / f"{WGMMA_PREFILL.name}.cu").read_text()
    assert "KernelTmaWarpSpecializedCooperativeFP8Blockwise" in pre and "Shape<_1, _2, _1>" in pre
    reg = (out / "sm90a" / "registry.cpp").read_text()
    assert f'if (M <= 64) return {{"{WGMMA_DECODE.name}", 1}};' in reg
    assert f'return {{"{WGMMA_PREFILL.replace(out_dtype="bf16").name}", 1}};' in reg
    api = (out / "include" / "atom_w4a4_api.h").read_text()
    assert "inline int staged_k(int K, int outliers)" in api
    # The plain CUDA TUs (fused quantization, KV4 attention) are emitted once and compiled for every arch's gencode.
    assert "quantize_rows_kernel" in (out / "quant_ops.cu").read_text()
    cm = (out / "sources.cmake").read_text()
    multiarch = cm.split("set(ATOM_MULTIARCH_SOURCES", 1)[1].split(")", 1)[0]
    assert '"${CMAKE_CURRENT_LIST_DIR}/quant_ops.cu"' in multiarch and '"${CMAKE_CURRENT_LIST_DIR}/attention.cu"' in multiarch
    assert "kv4_decode_kernel" in (out / "attention.cu").read_text()
    assert "compute_90a" in cm.split("ATOM_GENCODE_ALL", 1)[1].splitlines()[0]


def test_wgmma_overlap_mainloop_config_naming_and_render(tmp_path):
    ovl = WGMMA_PREFILL
    assert all(c.promotion == "overlap" for c in (WGMMA_DECODE, WGMMA_MEDIUM, WGMMA_PREFILL))
    # The overlap mainloop adds _ovl (after schedule/swap) and round-trips.
    assert ovl.name == "atom_w4a4_wgmma_sm90a_t128x128x128_w64x128_sauto_c1x2x1_ovl_g128_oany_f16"
    swap = WGMMA_MEDIUM.replace(out_dtype="bf16")
    assert swap.name == "atom_w4a4_wgmma_sm90a_t128x64x128_w64x64_sauto_swap_ovl_g128_oany_bf16"
    pp = KernelConfig("wgmma", "sm90a", 64, 128, 128, 64, 128, 0, group=128, schedule="pingpong", promotion="overlap")
    for c in (ovl, swap, pp):
        c.validate()
        assert KernelConfig.from_name(c.name) == c
    # Two temporaries + the accumulator: 192 registers at a 64x128 warp-group tile, 64x256 is too many.
    assert ovl.accumulator_regs == 192
    with pytest.raises(ConfigError, match="accumulator"):
        pp.replace(tile_n=256, warp_n=256).validate()
    with pytest.raises(ConfigError, match="promotion 'eager' not in"):
        WGMMA_PREFILL.replace(promotion="eager").validate()
    # CUTLASS's stock mainloop cannot read the staged INT8 outlier block: not a wgmma config.
    with pytest.raises(ConfigError, match="INT8 outlier block"):
        WGMMA_PREFILL.replace(promotion="stock").validate()
    with pytest.raises(ConfigError, match="only in the wgmma family"):
        LARGE.replace(promotion="overlap").validate()
    # Level 0: the three dispatch tiles, the _w4 medium tile and the two _w4 split-K tiles (both
    # dtypes); level 1 adds no-cluster, ping-pong, 16-token and the other _w4 tiles.
    lv0 = [c for c in level_configs(0) if c.family == "wgmma"]
    lv1 = [c for c in level_configs(1) if c.family == "wgmma"]
    assert lv0 == [WGMMA_DECODE, WGMMA_MEDIUM, WGMMA_PREFILL, WGMMA_MEDIUM_W4, *WGMMA_W4_SPLITK] and len(lv1) == 11
    assert [r.kernel.promotion for r in default_dispatch("sm90a").rules] == ["stock"] * 2 + ["overlap"] * 3
    m = default_manifest(["sm90a"])
    assert {ovl.name, ovl.replace(out_dtype="bf16").name} <= set(m.names())
    out = tmp_path / "gen"
    emit(m, out)
    src = (out / "sm90a" / f"{ovl.name}.cu").read_text()
    assert '#include "atom_wgmma_overlap.cuh"' in src
    assert "using CollectiveMainloop = atom::Sm90OverlapPromotionMma<StockMainloop, false>;" in src
    assert "(p.k_staged - (p.K - p.outliers)) / kBlock," in src  # the INT8 outlier k-tiles, at run time
    w4 = (out / "sm90a" / f"{WGMMA_MEDIUM_W4.name}.cu").read_text()
    assert "using CollectiveMainloop = atom::Sm90OverlapPromotionMma<StockMainloop, true>;" in w4
    assert "if (!p.w_frag4)" in w4 and "if (!p.w_frag4)" not in src
    hdr = (out / "include" / "atom_wgmma_overlap.cuh").read_text()
    assert "struct MainloopSm90OverlapPromotion" in hdr and "warpgroup_wait<1>()" in hdr
    assert "ss_op_selector<int8_t, int8_t, int32_t" in hdr and "__fmaf_rn(tmp(i), __fmul_rn(tCrSFA(i), tCrSFB(i))" in hdr
    assert "__fmaf_rn(__int2float_rn(dot(i)), __fmul_rn(tCrSFA(i), tCrSFB(i))" in hdr  # the outlier k-tile
    reg = (out / "sm90a" / "registry.cpp").read_text()
    assert f"&launch_{ovl.name}" in reg
    assert f'return {{"{ovl.name}", 1}}' in reg  # the default above M = 512
    data = json.loads((out / "manifest.json").read_text())
    assert {k["name"]: k["promotion"] for k in data["kernels"]}[ovl.name] == "overlap"


def test_smem_limit_depends_on_arch():
    big = LARGE.replace(tile_m=256, tile_n=128, warp_m=64, warp_n=32, stages=4, tile_k=128)
    assert 101376 < big.smem_bytes <= 166912
    big.replace(arch="sm80").validate()
    with pytest.raises(ConfigError, match="shared memory"):
        big.replace(arch="sm89").validate()


def test_bad_name_rejected():
    with pytest.raises(ConfigError, match="not a kernel name"):
        KernelConfig.from_name("atom_w4a4_mma_sm80_bogus")


# ---------------------------------------------------------------------------- manifest

def test_manifest_dedups_and_logs_culls(caplog):
    m = Manifest(["sm80"])
    assert m.append(LARGE)
    with caplog.at_level("INFO", logger="generator"):
        assert not m.append(LARGE)
        assert not m.append(LARGE.replace(arch="sm89"))
        assert not m.append(LARGE.replace(tile_k=96), strict=False)
    assert [w for _, w in m.culled][:2] == ["duplicate", "arch sm89 not selected"]
    assert "multiple of 64" in m.culled[2][1]
    assert "cull" in caplog.text
    with pytest.raises(ConfigError):
        m.append(LARGE.replace(tile_k=96))
    assert len(m) == 1


def test_default_manifest_is_small_and_levels_grow():
    m0 = default_manifest(["sm80"])
    assert len(m0) == 8  # large, small split-K, two stream tiles; fp16 + bf16: what CI compiles
    assert {c.out_dtype for c in m0.configs()} == {"f16", "bf16"}
    m1 = default_manifest(["sm80"], level=1)
    m2 = default_manifest(["sm80"], level=2)
    assert len(m0) < len(m1) < len(m2)
    assert m2.culled  # the cross product has impossible members, culled with a reason
    with pytest.raises(ConfigError, match="level"):
        level_configs(-1)


def test_unknown_arch_is_an_error():
    with pytest.raises(ConfigError, match="unknown arch 'sm70'"):
        Manifest(["sm70"])


@pytest.mark.parametrize("model", ["llama-7b", "llama-2-13b", "llama-3-8b", "smollm2-135m"])
def test_model_shapes_are_covered(model):
    shapes = model_shapes(model)
    assert {s.layer for s in shapes} == {"qkv", "o", "gate_up", "down"}
    m = default_manifest(["sm89"], shapes=shapes)
    for s, g, o, names in m.coverage():
        assert names, f"{s} not covered"


def test_model_from_hf_config_json(tmp_path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 1024,
           "intermediate_size": 2816, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    shapes = {s.layer: (s.n, s.k) for s in model_shapes(str(p))}
    assert shapes == {"qkv": (1024 + 2 * 256, 1024), "o": (1024, 1024), "gate_up": (5632, 1024), "down": (1024, 2816)}
    with pytest.raises(ConfigError, match="unknown model"):
        model_shapes("llama-1b-nope")


def test_outlier_rule_matches_formats():
    formats = pytest.importorskip("atom_ops.formats")
    for k in (576, 1536, 4096, 5120, 11008, 13824, 14336, 640, 704):
        for g in (64, 128):
            for req in (0, 64, 128, 256):
                try:
                    want = formats.choose_outliers(k, g, req)
                except formats.FormatError:
                    with pytest.raises(ConfigError):
                        outliers_for(k, g, req)
                    continue
                assert outliers_for(k, g, req) == want


# ---------------------------------------------------------------------------- dispatch

def test_dispatch_rules_are_checked():
    s, l = SMALL, LARGE
    check_rules([DispatchRule(16, s, 4), DispatchRule(None, l)], "ok")
    with pytest.raises(ConfigError, match="last rule"):
        check_rules([DispatchRule(16, s)], "t")
    with pytest.raises(ConfigError, match="increase"):
        check_rules([DispatchRule(64, s), DispatchRule(16, s), DispatchRule(None, l)], "t")
    with pytest.raises(ConfigError, match="not built with split-K"):
        check_rules([DispatchRule(None, l, 4)], "t")
    assert [r.max_m for r in default_dispatch("sm89").rules] == [16, 128, None]


def test_tuning_table(tmp_path):
    small = SMALL.replace(arch="sm89")
    mid = LARGE.replace(arch="sm89", tile_m=64, warp_m=32, stages=3)
    table = {"schema_version": 1, "gpu": "test", "archs": {"sm89": {
        "rules": [{"max_m": 8, "kernel": small.name, "split_k": 8}, {"max_m": None, "kernel": mid.name}],
        "shapes": [{"n": 4096, "k": 4096, "rules": [{"max_m": None, "kernel": small.name, "split_k": 2}]}]}}}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(table))
    d = load_tuning(p)
    m = default_manifest(["sm89"], dispatch=d)
    # only the table's kernels plus the safe fallback, in both dtypes
    assert set(m.names()) == {c.replace(out_dtype=dt).name for c in (small, mid, LARGE.replace(arch="sm89"))
                              for dt in ("f16", "bf16")}
    emit(m, tmp_path / "gen", d)
    reg = (tmp_path / "gen" / "sm89" / "registry.cpp").read_text()
    assert "if (N == 4096 && K == 4096)" in reg and f'if (M <= 8) return {{"{small.name}", 8}};' in reg
    bad = dict(table, schema_version=7)
    p.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="schema_version"):
        load_tuning(p)
    table["archs"]["sm89"]["rules"][0]["kernel"] = LARGE.replace(arch="sm80").name
    p.write_text(json.dumps(table))
    with pytest.raises(ConfigError, match="not sm89"):
        load_tuning(p)


# ----------------------------------------------------------------------------- emit

def test_emit_byte_identical_and_write_if_changed(tmp_path):
    out = tmp_path / "gen"
    m = default_manifest(["sm80", "sm90a"])
    r1 = emit(m, out)
    first = snapshot(out)
    assert "sources.cmake" in first and "sm80/registry.cpp" in first
    for name in m.names():
        arch = name.split("_")[3]
        text = first[f"{arch}/{name}.cu"].decode()
        assert text.startswith("// Generated by `python -m generator`") and "Do not edit" in text
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in first}
    time.sleep(0.01)
    r2 = emit(default_manifest(["sm80", "sm90a"]), out)
    assert r2["written"] == [] and r2["unchanged"] == len(r1["written"])
    assert snapshot(out) == first
    assert {p: os.stat(out / p).st_mtime_ns for p in first} == mtimes


def test_emit_removes_stale_files_by_name(tmp_path):
    out = tmp_path / "gen"
    emit(default_manifest(["sm80", "sm89"], level=1), out)
    keep = out / "sm80" / "notes.cu"
    keep.write_text("// hand-written, not generated\n")
    res = emit(default_manifest(["sm80"]), out)
    assert keep.exists()  # not generated: never removed
    assert not list((out / "sm89").glob("*.cu"))
    assert len(list((out / "sm80").glob("atom_w4a4_*.cu"))) == 8
    assert len(list((out / "sm80").glob("atom_int8_*.cu"))) == 1
    assert res["removed"]


def test_write_if_changed(tmp_path):
    p = tmp_path / "a" / "f.txt"
    assert write_if_changed(p, "x")
    t = os.stat(p).st_mtime_ns
    assert not write_if_changed(p, "x")
    assert os.stat(p).st_mtime_ns == t
    assert write_if_changed(p, "y") and p.read_text() == "y"


def test_strict_undefined_templates():
    import jinja2
    from generator.render import render
    with pytest.raises(jinja2.UndefinedError):
        render("kernel_mma.cu.j2")


# ------------------------------------------------------------------------------- CLI

def test_cli_list(capsys, tmp_path):
    assert cli_main(["--arch", "sm80", "89", "--model", "smollm2-135m", "--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "atom_w4a4_mma_sm80_t128x128x64_w64x32_s4_gany_oany_f16" in out and "sm89" in out
    assert "shape smollm2-135m/qkv N=960 K=576" in out
    assert not any(tmp_path.iterdir())  # --list writes nothing


def test_cli_errors(capsys, tmp_path):
    assert cli_main(["--arch", "sm75", "--out", str(tmp_path)]) == 2
    assert "unknown arch" in capsys.readouterr().err
    assert cli_main(["--arch", "sm80", "--tuning", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(["--arch", "sm80", "--model", "nope", "--out", str(tmp_path)]) == 2


def test_cli_help_documents_every_flag():
    r = subprocess.run([sys.executable, "-m", "generator", "--help"], cwd=REPO, capture_output=True, text=True,
                       check=True)
    for flag in ("--arch", "--model", "--level", "--tuning", "--out", "--list", "--verbose"):
        assert flag in r.stdout
    assert all(a in r.stdout for a in ARCHS)


def test_cli_writes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "generator", "--arch", "80;89", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["archs"] == ["sm80", "sm89"] and len(data["kernels"]) == 16
    cm = (tmp_path / "sources.cmake").read_text()
    assert "ATOM_SOURCES_sm89" in cm and "compute_80,code=[sm_80,compute_80]" in cm


# ------------------------------------------------------------------------ int8 family

def test_int8_family_names_manifest_and_emit(tmp_path):
    from generator.configs import Int8GemmConfig
    from generator.manifest import int8_configs
    sm80, = int8_configs("sm80")
    sm90, = int8_configs("sm90a")
    assert sm80.name == "atom_int8_gemm_sm80_t128x256x64_w64x64_s3_i32"
    assert sm90.name == "atom_int8_gemm_sm90a_t128x256x128_sauto_c2x1x1_cooperative_i32"
    assert int8_configs("sm86") == [] and int8_configs("sm89") == []  # sm80's PTX-carrying code runs there
    with pytest.raises(ConfigError, match="cluster"):
        Int8GemmConfig("sm80", 128, 256, 64, 64, 64, 3, cluster=(2, 1, 1)).validate()
    with pytest.raises(ConfigError, match="shared memory"):
        Int8GemmConfig("sm80", 256, 256, 128, 64, 64, 4).validate()
    with pytest.raises(ConfigError, match="schedule"):
        Int8GemmConfig("sm90a", 128, 256, 128, cluster=(2, 1, 1), schedule="multistage").validate()
    with pytest.raises(ConfigError, match="built for"):
        Int8GemmConfig("sm89", 128, 256, 64, 64, 64, 3).validate()
    out = tmp_path / "gen"
    m = default_manifest(["sm80", "sm89", "sm90a"])
    emit(m, out)
    assert (out / "sm80" / f"{sm80.name}.cu").is_file() and (out / "sm90a" / f"{sm90.name}.cu").is_file()
    assert not list((out / "sm89").glob("atom_int8_*.cu"))
    assert sm80.name not in m.names()  # not a W4A4 kernel: never dispatched, never in the W4A4 table
    data = json.loads((out / "manifest.json").read_text())
    assert [k["name"] for k in data["int8_kernels"]] == [sm80.name, sm90.name]
    # 8 mma on sm80 and on sm89; sm90a: its level-0 kernels and the H100 table's picks (test above)
    assert len(data["kernels"]) == 16 + len(default_manifest(["sm90a"]))
    cm = (out / "sources.cmake").read_text()
    assert f"sm80/{sm80.name}.cu" in cm and f"sm90a/{sm90.name}.cu" in cm
    reg = (out / "sm80" / "registry.cpp").read_text()
    assert f"&launch_{sm80.name}" in reg and "int8_kernels_sm80" in reg
    assert "return nullptr;" in (out / "sm89" / "registry.cpp").read_text()  # empty table, no zero-size array
    src90 = (out / "sm90a" / f"{sm90.name}.cu").read_text()
    assert "KernelTmaWarpSpecializedCooperative" in src90 and "Shape<_128, _256, _128>" in src90
    assert "Shape<_2, _1, _1>" in src90
    src80 = (out / "sm80" / f"{sm80.name}.cu").read_text()
    assert "GemmShape<128, 256, 64>" in src80 and "OpMultiplyAddSaturate" in src80


def test_weight_fragment_configs():
    # _w4 = 4-bit weight fragments (RS wgmma): wgmma swap-AB tiles without cluster only
    from generator.manifest import WGMMA_W4_LEVEL1
    for cfg in (WGMMA_MEDIUM_W4, *WGMMA_W4_SPLITK, *WGMMA_W4_LEVEL1):
        cfg.validate()
        assert "_ovl_w4_" in cfg.name and KernelConfig.from_name(cfg.name) == cfg
    with pytest.raises(ConfigError, match="need swap_ab"):
        WGMMA_PREFILL.replace(cluster=(1, 1, 1), weights="frag4").validate()
    with pytest.raises(ConfigError, match="no cluster"):
        WGMMA_MEDIUM_W4.replace(cluster=(1, 2, 1)).validate()
    with pytest.raises(ConfigError, match="only in the wgmma family"):
        SMALL.replace(weights="frag4").validate()
    # split-K: the _w4 cooperative tiles only (stream-K scheduler; k-tile records)
    assert all(c.split_k and c.name.endswith("_ovl_w4_sk_g128_oany_f16") for c in WGMMA_W4_SPLITK)
    with pytest.raises(ConfigError, match="wgmma split-K exists only"):
        WGMMA_MEDIUM.replace(split_k=True).validate()
    with pytest.raises(ConfigError, match="wgmma split-K exists only"):
        WGMMA_DECODE.replace(weights="frag4", split_k=True).validate()
