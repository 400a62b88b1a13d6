"""bench/e2e.py end to end on the CPU with a tiny random model (fp16 and atom modes): the
harness that measures serving throughput on the GPU (there: `python -m bench.e2e`)."""

from __future__ import annotations

import dataclasses
import json

import torch

from bench import e2e
from models.config import LlamaConfig


def test_e2e_bench_runs_and_reports(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(0)
    rc = e2e.main(["--models", str(path), "--modes", "fp16", "atom", "--batch", "1", "3", "--input", "12",
                   "--output", "4", "--device", "cpu", "--kv-gib", "0.01", "--out", str(tmp_path), "--tag", "t",
                   "--profile", "2", "--profile-batch", "3", "--prefill-tokens", "24"])
    assert rc == 0
    data = json.loads((tmp_path / "e2e_t.json").read_text())
    rows = {(r["impl"], r["case"]["batch"]): r for r in data["rows"]}
    assert set(rows) == {("fp16", 1), ("fp16", 3), ("atom", 1), ("atom", 3)}
    for (mode, batch), r in rows.items():
        assert "error" not in r, r
        assert r["tokens"] == batch * 4 and r["tokens_per_s"] > 0
        assert r["kv_format"] == ("kv4" if mode == "atom" else "float")
        assert r["case"]["prefill_tokens"] == 24 and 0 < r["prefill_phase_s"] <= r["total_s"]
        # per-request latency: every request's first token after 0, its last by the end of the run
        ttft, tpot, lat = r["request_ttft_s"], r["request_tpot_ms"], r["request_latency_s"]
        assert 0 < ttft["p50"] <= ttft["p99"] <= lat["p99"] <= r["total_s"] + 1e-3
        assert 0 < tpot["p50"] <= tpot["p99"] and ttft["mean"] > 0
    assert rows[("atom", 3)]["kv_fit_sequences"] == 3  # the whole batch at once
    assert rows[("atom", 3)]["kv_capacity_sequences"] > 3 * rows[("fp16", 3)]["kv_capacity_sequences"]  # KV4
    text = (tmp_path / "e2e_t.txt").read_text()
    assert "atom_vs_fp16" in text
    assert "Per-request latency" in text and "tpot_p50_ms" in text  # the second table
    assert (tmp_path / "e2e_t.png").exists() or e2e.new_figure() is None
    profile = (tmp_path / "e2e_t_profile.txt").read_text()  # where a step's time goes, per mode
    for mode in ("fp16", "atom"):
        assert f"== {mode}: first prefill step (up to 24 tokens" in profile
        assert f"== {mode}: 2 decode steps, batch 3" in profile


def test_e2e_bench_unequal_prompts(tmp_path):
    """--input-min: prompts of unequal lengths (packed prefill steps of several attention runs)."""
    import pytest

    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    common = ["--models", str(path), "--modes", "atom", "--batch", "4", "--input", "12", "--output", "3",
              "--device", "cpu", "--kv-gib", "0.01", "--out", str(tmp_path), "--prefill-tokens", "40"]
    assert e2e.main(common + ["--input-min", "3", "--tag", "u"]) == 0
    (row,) = json.loads((tmp_path / "e2e_u.json").read_text())["rows"]
    assert "error" not in row and row["tokens"] == 4 * 3 and row["case"]["input_min"] == 3
    assert " 3-12 " in (tmp_path / "e2e_u.txt").read_text()  # the table states the prompt range
    with pytest.raises(SystemExit):  # argparse's error: lengths must fit in 1..--input
        e2e.main(common + ["--input-min", "13"])


def test_e2e_repeat_reports_the_median_run(tmp_path):
    """--repeat N: every case runs N times and the row is the median run, with all runs' rates."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    rc = e2e.main(["--models", str(path), "--modes", "fp16", "--batch", "2", "--input", "6", "--output", "3",
                   "--device", "cpu", "--kv-gib", "0.01", "--out", str(tmp_path), "--tag", "r", "--repeat", "3",
                   "--prefill-tokens", "12"])
    assert rc == 0
    (row,) = json.loads((tmp_path / "e2e_r.json").read_text())["rows"]
    runs = row["tokens_per_s_runs"]
    assert row["repeats"] == 3 and len(runs) == 3
    assert round(row["tokens_per_s"], 1) == sorted(runs)[1]  # the median run's own figures
    assert abs(row["spread"] - (max(runs) / min(runs) - 1)) < 1e-2  # runs are stored rounded to 0.1 tok/s


def test_median_run_picks_the_middle_rate():
    runs = [{"tokens_per_s": 10.0, "step_ms": 1}, {"tokens_per_s": 30.0, "step_ms": 3}, {"tokens_per_s": 20.0, "step_ms": 2}]
    r = e2e.median_run(runs)
    assert r["step_ms"] == 2 and r["tokens_per_s_runs"] == [10.0, 30.0, 20.0] and r["spread"] == 2.0
    assert e2e.median_run(runs[:2])["step_ms"] == 1  # even count: the lower middle run


def test_prefill_host_bench_reports_host_and_python_time(tmp_path):
    """bench/prefill_host.py on the CPU: each mode's timed prefill steps, the forward's host time
    within each step's wall time, and the top Python functions of a step."""
    from bench import prefill_host

    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert prefill_host.main(["--model", str(path), "--modes", "fp16", "atom", "--prompts", "2", "--input", "24",
                              "--repeat", "2", "--device", "cpu", "--out", str(tmp_path), "--tag", "p"]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "prefill_host_p.json").read_text())["rows"]}
    assert set(rows) == {"fp16", "atom"}
    for r in rows.values():
        assert len(r["wall_ms"]) == len(r["forward_host_ms"]) == 2
        assert all(0 < h <= w for h, w in zip(r["forward_host_ms"], r["wall_ms"]))
        assert r["top_python"] and r["top_python"][0]["own_ms"] >= r["top_python"][-1]["own_ms"]
    # the atom model's step runs the W4A4 reference on the CPU: it shows up by name
    assert any("w4a4_matmul_reference" in f["function"] for f in rows["atom"]["top_python"])
    assert "top Python functions" in (tmp_path / "prefill_host_p.txt").read_text()
