"""bench.gqa on the CPU (the reference backend: a smoke test of the loop, the equality check and the table)."""

import json

from bench import gqa


def test_gqa_bench_runs_and_finds_the_paths_equal(tmp_path, monkeypatch):
    monkeypatch.setattr(gqa, "CASES", ((1, 16, 4, 2), (2, 8, 4, 4)))
    assert gqa.main(["--device", "cpu", "--iters", "2", "--out", str(tmp_path), "--tag", "cpu"]) == 0
    rows = json.loads((tmp_path / "gqa_cpu.json").read_text())["rows"]
    assert [(r["batch"], r["kv_heads"]) for r in rows] == [(1, 2), (2, 4)]
    assert all(r["bit_exact"] and r["repeat_us"] > 0 and r["gqa_us"] > 0 for r in rows)
    assert "enable_gqa us" in (tmp_path / "gqa_cpu.txt").read_text()
