"""bench.host_overhead on the CPU (the reference paths: a smoke test of the loop and its output)."""

import json

from bench import host_overhead


def test_host_overhead_runs_and_writes_its_table(tmp_path):
    assert host_overhead.main(["--device", "cpu", "--k", "256", "--n", "128", "--iters", "3",
                               "--out", str(tmp_path), "--tag", "cpu"]) == 0
    data = json.loads((tmp_path / "host_overhead_cpu.json").read_text())
    cases = [r["case"] for r in data["rows"]]
    assert cases == ["torch.mm", "op layer: none (direct call)", "op layer: torch.library.custom_op",
                     "op layer: atom_op", "atom_ops.quantized_linear", "kv4_gather", "sdpa"]
    assert all(r["wall_us"] >= r["host_us"] > 0 for r in data["rows"])
    assert data["rows"][0]["vs_torch_mm"] == 1.0 and (data["k"], data["n"]) == (256, 128)
    assert "host vs torch.mm" in (tmp_path / "host_overhead_cpu.txt").read_text()


def test_host_per_call_counts_every_call():
    calls = []
    host, wall = host_overhead.host_per_call(lambda: calls.append(1), 10, lambda: None)
    assert len(calls) == 20 and wall >= host > 0  # 10 warm-up calls (min(iters, 20)), 10 timed


def test_layer_probe_is_one_body_behind_both_registrations():
    import torch

    via_custom_op, via_atom_op = host_overhead.layer_ops()
    assert host_overhead.layer_ops() == (via_custom_op, via_atom_op)  # registered once per process
    x, w = torch.zeros(3, 8), torch.zeros(5, 4, dtype=torch.uint8)
    args = (x, None, None, 1e-5, 1, 1.0, w, w, w, 128, torch.bfloat16, None)
    for op in (via_custom_op, via_atom_op):
        out = op(*args)
        assert out.shape == (3, 5) and out.dtype == torch.bfloat16
