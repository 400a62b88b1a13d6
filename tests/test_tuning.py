"""CPU tests of the tuner's mechanics (tuning/): table schema, dispatch through the generator,
study pruning, resume and time budget with a fake measurement. The real objective
(tuning/objective.py, CUDA events) runs only on a GPU: `python -m tuning` on the H100."""

from __future__ import annotations

import json
import time

import pytest
import torch

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState

from generator import default_manifest, emit
from generator.configs import ConfigError
from generator.dispatch import load_tuning
from generator.manifest import LARGE, SMALL
from tuning import cli, table
from tuning.gpu import arch_for_cc, gpu_slug
from tuning.shapes import model_shapes
from tuning.space import Candidate, build_spaces, default_choice
from tuning.study import StudyTask, run_all, run_study, storage_url

# sm89: the mma family only, whose default dispatch is the small split-K tile then the large tile
ARCH = "sm89"
SMALL_K = SMALL.replace(arch=ARCH).name
LARGE_K = LARGE.replace(arch=ARCH).name
MID_K = "atom_w4a4_mma_sm89_t64x128x64_w32x32_s4_gany_oany_f16"
SK32_K = "atom_w4a4_mma_sm89_t32x128x64_w32x32_s4_sk_gany_oany_f16"
COMPILED = {SMALL_K, LARGE_K, MID_K, SK32_K}


def space_4096(compiled=COMPILED):
    (space,) = build_spaces(ARCH, 4096, 4096, set(compiled))
    return space


def fake_us(c: Candidate) -> float:
    """A deterministic fake cost: the mid tile is fastest, split-K helps the small tiles a bit."""
    base = {SMALL_K: 30.0, LARGE_K: 50.0, MID_K: 20.0, SK32_K: 25.0}[c.kernel]
    return base / (1 + 0.01 * (c.split_k - 1))


def fake_factory(task, fail=(), sleep=0.0, calls=None):
    def measure(c, best_us):
        if calls is not None:
            calls.append(c)
        if sleep:
            time.sleep(sleep)
        if c.kernel in fail:
            raise RuntimeError(f"fake launch failure of {c.kernel}")
        return {"median_us": fake_us(c), "min_us": fake_us(c), "max_us": fake_us(c), "iters": 20}
    return measure


# ------------------------------------------------------------------------------ gpu, shapes, space

def test_gpu_slug_and_arch():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert arch_for_cc(90) == "sm90a" and arch_for_cc(89) == "sm89" and arch_for_cc(80) == "sm80"
    with pytest.raises(RuntimeError, match="compute capability 7.5"):
        arch_for_cc(75)


def test_model_shapes_dedup_and_json(tmp_path):
    shapes = model_shapes(["llama-7b"])
    assert [(s.n, s.k) for s in shapes] == [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"vocab_size": 10, "hidden_size": 4096, "intermediate_size": 11008,
                               "num_hidden_layers": 1, "num_attention_heads": 32}))
    both = model_shapes(["llama-7b", str(cfg)])
    assert len(both) == 4 and both[1].layers == ("llama-7b/o", "config/o")
    with pytest.raises(ValueError, match="unknown model"):
        model_shapes(["nope-1b"])


def test_space_candidates_and_missing():
    space = space_4096()
    cands = space.candidates()
    # split factors only for the split-K kernels, 1 + 7 each; 1 each for the others
    assert len(cands) == 2 * (1 + len(space.split_factors)) + 2
    assert all(c.split_k == 1 for c in cands if c.kernel in (LARGE_K, MID_K))
    assert set(space.compiled) == COMPILED and len(space.missing()) > 50
    # tile_k=128 kernels run group 128 (the tuned group) but not group 64 (--also-groups 64)
    assert any("t128x128x128" in k for k in space.kernels)
    (safe,) = build_spaces(ARCH, 4096, 4096, set(COMPILED), also_groups=(64,))
    assert not any("x128_w" in k for k in safe.kernels) and set(safe.compiled) == COMPILED
    assert space.fingerprint() != space_4096(COMPILED - {MID_K}).fingerprint()
    assert default_choice(ARCH, 1) == Candidate(SMALL_K, 4)
    assert default_choice(ARCH, 100) == Candidate(SMALL_K, 1)
    assert default_choice(ARCH, 4096) == Candidate(LARGE_K, 1)


# ------------------------------------------------------------------------------------- table

def tuned_table(min_gain=0.02):
    b = [table.BucketResult(16, table.Choice(SMALL_K, 4), table.Choice(SK32_K, 2), 9.0, 12.0, 20, "s16"),
         table.BucketResult(256, table.Choice(LARGE_K, 1), table.Choice(MID_K, 1), 40.0, 50.0, 20, "s256"),
         table.BucketResult(4096, table.Choice(LARGE_K, 1), table.Choice(MID_K, 1), 400.0, 500.0, 20, "s4096")]
    rules = table.shape_rules(b, min_gain)
    return table.merge_table(None, "NVIDIA Fake GPU", ARCH, [{"n": 4096, "k": 4096, "layers": ["x/o"],
                                                              "rules": rules}], {"iters": 20})


def test_table_roundtrip_and_schema(tmp_path):
    t = tuned_table()
    rules = t["archs"][ARCH]["shapes"][0]["rules"]
    # adjacent buckets with the same choice merge; the last rule is unbounded
    assert [(r["max_m"], r["kernel"], r["split_k"]) for r in rules] == [(16, SK32_K, 2), (None, MID_K, 1)]
    assert [b["m"] for b in rules[1]["buckets"]] == [256, 4096]
    assert rules[0]["buckets"][0]["default_us"] == 12.0 and rules[0]["buckets"][0]["median_us"] == 9.0
    assert t["archs"][ARCH]["rules"] == table.default_rules(ARCH)
    path = table.write_table(t, tmp_path / "gpu.json")
    assert table.read_table(path) == t
    d = load_tuning(path)[ARCH]
    assert d.shapes[0][:2] == (4096, 4096) and d.shapes[0][2][0].split_k == 2
    # a second model merges into the same table; the same shape is replaced, not duplicated
    t2 = table.merge_table(t, "NVIDIA Fake GPU", ARCH, [{"n": 576, "k": 576, "rules": table.default_rules(ARCH)},
                                                        {"n": 4096, "k": 4096, "rules": table.default_rules(ARCH)}])
    assert [(s["n"], s["k"]) for s in t2["archs"][ARCH]["shapes"]] == [(576, 576), (4096, 4096)]
    with pytest.raises(ConfigError, match="not 'NVIDIA Other'"):
        table.merge_table(t, "NVIDIA Other", ARCH, [])


def test_min_gain_keeps_default():
    b = table.BucketResult(16, table.Choice(SMALL_K, 4), table.Choice(SK32_K, 2), 11.9, 12.0)
    assert b.chosen(0.02) == (table.Choice(SMALL_K, 4), 12.0)
    assert b.chosen(0.0) == (table.Choice(SK32_K, 2), 11.9)
    unmeasured = table.BucketResult(16, table.Choice(SMALL_K, 4), note="time budget used up")
    rules = table.shape_rules([unmeasured], 0.02)
    assert rules[0]["kernel"] == SMALL_K and rules[0]["buckets"][0]["note"] == "time budget used up"


@pytest.mark.parametrize("mutate, why", [
    (lambda t: t.update(schema_version=2), "schema_version must be 1"),
    (lambda t: t["archs"][ARCH]["shapes"][0]["rules"][0].update(kernel=SMALL.name), "is for sm80"),
    (lambda t: t["archs"][ARCH]["shapes"][0]["rules"][1].update(split_k=2), "not built with split-K"),
    (lambda t: t["archs"][ARCH]["shapes"][0]["rules"][0].update(max_m=None), "not the last rule"),
    (lambda t: t["archs"][ARCH]["rules"][1].update(max_m=8), "must increase"),
    (lambda t: t["archs"][ARCH]["shapes"][0]["rules"][0].update(kernel="atom_bogus"), "not a kernel name"),
])
def test_table_validation_errors(tmp_path, mutate, why):
    t = tuned_table()
    mutate(t)
    with pytest.raises(ConfigError, match=why):
        table.write_table(t, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()  # nothing half-written


def test_lookup_selection_and_fallback():
    t = tuned_table()
    assert table.lookup(t, ARCH, 1, 4096, 4096) == table.Choice(SK32_K, 2)
    assert table.lookup(t, ARCH, 17, 4096, 4096) == table.Choice(MID_K, 1)
    assert table.lookup(t, ARCH, 100000, 4096, 4096) == table.Choice(MID_K, 1)
    assert table.lookup(t, ARCH, 1, 4096, 4096, "bf16").kernel == SK32_K.replace("_f16", "_bf16")
    # unknown shape: the generic (default) rules, or None when asked for tuned shapes only
    assert table.lookup(t, ARCH, 1, 1024, 4096) == table.Choice(SMALL_K, 4)
    assert table.lookup(t, ARCH, 1000, 1024, 4096) == table.Choice(LARGE_K, 1)
    assert table.lookup(t, ARCH, 1, 1024, 4096, generic=False) is None
    assert table.lookup(t, "sm80", 1, 4096, 4096) is None


def test_table_through_the_generator(tmp_path):
    """table -> `python -m generator --tuning` path: only the chosen kernels + fallback, per-shape
    if-chain first, generic rules after it (unknown shapes never fail)."""
    path = table.write_table(tuned_table(), tmp_path / "gpu.json")
    dispatch = load_tuning(path)
    m = default_manifest([ARCH], dispatch=dispatch)
    assert {c.name.replace("_bf16", "_f16") for c in m.configs(ARCH)} == {SK32_K, MID_K, SMALL_K, LARGE_K}
    emit(m, tmp_path / "gen", dispatch)
    reg = (tmp_path / "gen" / ARCH / "registry.cpp").read_text()
    f16 = reg[reg.index("kF16) {"):reg.index("kBF16) {")]
    shape_block = f16[f16.index("if (N == 4096 && K == 4096)"):]
    first_rule = shape_block.index(f'if (M <= 16) return {{"{SK32_K}", 2}};')
    assert first_rule < shape_block.index(f'return {{"{MID_K}", 1}};')
    generic = f16[f16.index("}", f16.index("if (N == 4096 && K == 4096)")):]
    assert f'if (M <= 16) return {{"{SMALL_K}", 4}};' in generic and f'return {{"{LARGE_K}", 1}};' in generic
    assert cli_gen(path, tmp_path / "gen2") == 0


def cli_gen(path, out):
    from generator.cli import main
    return main(["--arch", ARCH, "--tuning", str(path), "--out", str(out), "--model", "llama-7b"])


# ------------------------------------------------------------------------------------ studies

def test_pruned_candidates_are_recorded_and_study_continues(tmp_path):
    space = space_4096()
    task = StudyTask(space, 16, default_choice(ARCH, 16), ("x/o",))
    url = storage_url(tmp_path / "s.sqlite3")
    out = run_study(task, lambda t: fake_factory(t, fail={SK32_K, LARGE_K}), url, trials=40, timeout_s=None)
    study = optuna.load_study(study_name=task.name, storage=url)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert pruned and done and out.fatal is None
    assert all(t.user_attrs["reason"].startswith("RuntimeError") or "fake launch failure" in t.user_attrs["reason"]
               for t in pruned)
    assert {t.params["kernel"] for t in pruned} == {SK32_K, LARGE_K}
    # exhaustive (space of 18 <= 40 trials): every candidate tried once, best = the mid tile
    assert len(pruned) + len(done) == len(space.candidates())
    assert out.best == Candidate(MID_K, 1) and out.best_us == 20.0
    assert out.default_us == fake_us(Candidate(SMALL_K, 4))  # the default was enqueued and measured
    assert study.trials[0].params == {"kernel": SMALL_K, "split_k": 4}


def test_fatal_error_stops_the_run_cleanly(tmp_path):
    space = space_4096()
    tasks = [StudyTask(space, m, default_choice(ARCH, m)) for m in (1, 16)]

    class Lost(RuntimeError):
        fatal = True

    def factory(task):
        def measure(c, best):
            raise Lost("CUDA error: an illegal memory access was encountered")
        return measure

    outs = run_all(tasks, factory, storage_url(tmp_path / "s.sqlite3"), trials=5, progress=False)
    assert outs[0].fatal and "illegal memory access" in outs[0].fatal and outs[0].new_trials == 1
    assert outs[1].skipped == outs[0].fatal


def test_resume_adds_trials_to_the_same_study(tmp_path):
    space = space_4096()
    task = StudyTask(space, 256, default_choice(ARCH, 256))
    db = tmp_path / "studies.sqlite3"
    calls = []
    first = run_all([task], lambda t: fake_factory(t, calls=calls), storage_url(db), trials=4, progress=False)
    second = run_all([task], lambda t: fake_factory(t, calls=calls), storage_url(db), trials=4, progress=False)
    assert first[0].new_trials == second[0].new_trials == 4
    summaries = optuna.get_all_study_summaries(storage_url(db))
    assert [s.study_name for s in summaries] == [task.name] and summaries[0].n_trials == 8
    assert second[0].complete == 8
    assert len(set(calls)) == len(calls)  # a repeated candidate is never timed twice
    assert default_choice(ARCH, 256) == calls[0]  # the default is measured first, once
    # a study the budget leaves out still reports what earlier runs stored
    (left_out,) = run_all([task], fake_factory, storage_url(db), trials=4, time_budget_s=1e-9, progress=False)
    assert left_out.skipped.startswith("time budget") and left_out.new_trials == 0
    assert (left_out.best, left_out.complete) == (second[0].best, 8)


def test_time_budget_is_respected(tmp_path):
    space = space_4096()
    tasks = [StudyTask(space, m, default_choice(ARCH, m)) for m in (1, 16, 64, 256)]
    t0 = time.monotonic()
    outs = run_all(tasks, lambda t: fake_factory(t, sleep=0.1), storage_url(tmp_path / "s.sqlite3"),
                   trials=50, time_budget_s=1.0, progress=False)
    elapsed = time.monotonic() - t0
    # budget checked between trials: at most one trial (0.1 s) plus SQLite overhead past it (1.87 s
    # was seen once on a loaded 2-core machine; without the budget the 4 studies take several seconds)
    assert elapsed < 1.0 + 1.5, elapsed
    ran = sum(o.new_trials for o in outs)
    assert 0 < ran < 4 * len(space.candidates())
    assert all(o.skipped is None or "time budget" in o.skipped for o in outs)


def test_run_all_reports_uncompiled_space(tmp_path):
    task = StudyTask(space_4096(set()), 16, default_choice(ARCH, 16))
    (out,) = run_all([task], fake_factory, storage_url(tmp_path / "s.sqlite3"), trials=3, progress=False)
    assert out.skipped.startswith("none of the") and out.skipped.endswith("candidate kernels is compiled")


def test_bucket_results_feed_the_table(tmp_path):
    space = space_4096()
    tasks = [StudyTask(space, m, default_choice(ARCH, m)) for m in (16, 4096)]
    outs = run_all(tasks, fake_factory, storage_url(tmp_path / "s.sqlite3"), trials=40, progress=False)
    res = cli.bucket_results(tasks, outs)
    rules = table.shape_rules(res[(4096, 4096)], 0.02)
    assert [(r["max_m"], r["kernel"]) for r in rules] == [(None, MID_K)]
    assert rules[0]["buckets"][1]["default_kernel"] == LARGE_K and rules[0]["buckets"][1]["default_us"] == 50.0


# ---------------------------------------------------------------------------------- CLI, bench

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_gpu_is_a_clear_error(capsys):
    assert cli.main(["--model", "smollm2-135m"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    from bench import tuning as bench_tuning
    assert bench_tuning.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_cli_list_without_gpu(capsys):
    assert cli.main(["--model", "smollm2-135m", "--arch", ARCH, "--list", "--m-buckets", "16", "1"]) == 0
    out = capsys.readouterr().out
    assert "N=960 K=576" in out and "M buckets [1, 16]" in out and "# 8 studies" in out


def test_objective_output_check():
    from tuning.objective import check_output
    ref = torch.randn(8, 16).half()
    assert check_output(ref.clone(), ref) is None
    bad = ref.clone()
    bad[0, 0] += 1
    assert "1 of 128 elements" in check_output(bad, ref)
    bad[1, 1] = float("nan")
    assert "non-finite" in check_output(bad, ref)


def test_cli_end_to_end_with_a_fake_gpu(tmp_path, monkeypatch, capsys):
    """The CLI's glue (spaces -> studies -> table) with the GPU and the objective faked; a second
    run resumes the same studies and updates the same table."""
    from atom_ops import kernels
    from tuning import objective
    from tuning.gpu import GpuInfo

    monkeypatch.setattr(cli, "detect_gpu", lambda arch="auto": GpuInfo("NVIDIA Fake GPU", 132, 89, ARCH))
    monkeypatch.setattr(cli, "compiled_kernels", lambda arch: set(COMPILED))
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(objective, "GemmProblem", lambda *key: key)

    class FakeObjective:
        def __init__(self, problem, **kw):
            self.measure = fake_factory(None)

    monkeypatch.setattr(objective, "CudaObjective", FakeObjective)
    argv = ["--model", "llama-7b", "--m-buckets", "16", "4096", "--trials", "3", "--study-db",
            str(tmp_path / "s.sqlite3"), "--out", str(tmp_path / "t.json"), "--no-progress"]
    assert cli.main(argv) == 0
    t = table.read_table(tmp_path / "t.json")
    from atom_ops.kernels import OP_REVISION
    assert t["tuning"]["op_revision"] == OP_REVISION  # what the run-time lookup checks
    assert t["gpu"] == "NVIDIA Fake GPU" and t["gpu_info"] == {"sm_count": 132, "cc": 89}
    assert [(s["n"], s["k"]) for s in t["archs"][ARCH]["shapes"]] == [(4096, 4096), (4096, 11008), (12288, 4096),
                                                                     (22016, 4096)]
    assert "wrote" in capsys.readouterr().out
    assert cli.main(argv) == 0
    summaries = optuna.get_all_study_summaries(storage_url(tmp_path / "s.sqlite3"))
    assert len(summaries) == 8 and all(s.n_trials == 6 for s in summaries)


def test_runtime_table_lookup(tmp_path, monkeypatch):
    from tuning import runtime

    path = table.write_table(tuned_table(), tmp_path / "gpu.json")
    monkeypatch.setenv(runtime.ENV_TABLE, str(path))
    runtime.runtime_table.cache_clear()
    runtime.tuned_choice.cache_clear()
    assert runtime.tuned_choice("NVIDIA Fake GPU", ARCH, 1, 4096, 4096, "bf16") == \
        table.Choice(SK32_K.replace("_f16", "_bf16"), 2)
    assert runtime.tuned_choice("NVIDIA Fake GPU", ARCH, 1, 1024, 4096, "f16") is None  # untuned shape
    runtime.runtime_table.cache_clear()
    with pytest.warns(UserWarning, match="it is for 'NVIDIA Fake GPU'"):
        assert runtime.runtime_table("NVIDIA Other") is None
    (tmp_path / "bad.json").write_text("{")
    monkeypatch.setenv(runtime.ENV_TABLE, str(tmp_path / "bad.json"))
    runtime.runtime_table.cache_clear()
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert runtime.runtime_table("NVIDIA Fake GPU") is None
    monkeypatch.setenv(runtime.ENV_TABLE, "off")
    runtime.runtime_table.cache_clear()
    assert runtime.runtime_table("NVIDIA Fake GPU") is None
    runtime.runtime_table.cache_clear()
    runtime.tuned_choice.cache_clear()


def test_runtime_table_needs_the_same_op_revision(tmp_path, monkeypatch):
    """atom_ops passes its OP_REVISION: a table measured on another op path (or not saying
    which) is ignored with a warning, one written by `python -m tuning` now is used."""
    from atom_ops.kernels import OP_REVISION
    from tuning import runtime

    t = tuned_table()
    t.setdefault("tuning", {}).pop("op_revision", None)
    monkeypatch.setenv(runtime.ENV_TABLE, str(table.write_table(t, tmp_path / "old.json")))
    runtime.runtime_table.cache_clear()
    runtime.tuned_choice.cache_clear()
    with pytest.warns(UserWarning, match="op revision None"):
        assert runtime.tuned_choice("NVIDIA Fake GPU", ARCH, 1, 4096, 4096, "f16", OP_REVISION) is None
    assert runtime.tuned_choice("NVIDIA Fake GPU", ARCH, 1, 4096, 4096, "f16") is not None  # no check asked
    t["tuning"]["op_revision"] = OP_REVISION
    monkeypatch.setenv(runtime.ENV_TABLE, str(table.write_table(t, tmp_path / "new.json")))
    runtime.runtime_table.cache_clear()
    runtime.tuned_choice.cache_clear()
    assert runtime.tuned_choice("NVIDIA Fake GPU", ARCH, 1, 4096, 4096, "f16", OP_REVISION) == \
        table.Choice(SK32_K, 2)
    runtime.runtime_table.cache_clear()
    runtime.tuned_choice.cache_clear()


def test_bench_tuning_glue_with_a_fake_gpu(tmp_path, monkeypatch, capsys):
    """bench/tuning.py's rows, JSON, text and PNG with the GPU and the measurement faked."""
    from atom_ops import kernels
    from bench import common
    from bench import tuning as bench_tuning
    from tuning import gpu as tuning_gpu

    path = table.write_table(tuned_table(), tmp_path / "gpu.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(common, "gpu_name", lambda: "NVIDIA Fake GPU")
    monkeypatch.setattr(bench_tuning, "L2Flusher", lambda: None)
    monkeypatch.setattr(tuning_gpu, "detect_gpu",
                        lambda arch="auto": tuning_gpu.GpuInfo("NVIDIA Fake GPU", 132, 89, ARCH))

    def fake_case(m, n, k, group, choices, iters, graph, flush):
        return {impl: {"kernel": c.kernel, "split_k": c.split_k, "median_us": fake_us(Candidate(c.kernel, c.split_k))}
                for impl, c in choices.items()}

    monkeypatch.setattr(bench_tuning, "measure_case", fake_case)
    assert bench_tuning.main(["--table", str(path), "--models", "llama-7b", "--m", "1", "4096",
                              "--out", str(tmp_path), "--tag", "fake"]) == 0
    data = json.loads((tmp_path / "tuning_fake.json").read_text())
    assert data["bench"] == "tuning" and {r["impl"] for r in data["rows"]} == {"tuned", "default"}
    assert len(data["rows"]) == 4 * 2 * 2
    # o_proj (4096 x 4096) is tuned: the mid tile at M=4096 (20 us) vs the default large tile (50 us)
    o_4096 = {r["impl"]: r["median_us"] for r in data["rows"] if r["case"]["layer"] == "o" and r["case"]["M"] == 4096}
    assert o_4096 == {"tuned": 20.0, "default": 50.0}
    assert data["geomean_speedup"] > 1.0
    assert (tmp_path / "tuning_fake.png").stat().st_size > 0
    assert "geometric-mean speedup" in capsys.readouterr().out
