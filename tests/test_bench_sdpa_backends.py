"""bench.sdpa_backends: refuses without a GPU; on one, times every backend at new shapes."""

import json

import pytest
import torch

from bench import sdpa_backends


def test_refuses_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sdpa_backends.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_times_every_backend_at_unseen_shapes(tmp_path):
    assert sdpa_backends.main(["--lengths", "2", "--iters", "3", "--out", str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "sdpa_backends_t.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["default", "cudnn", "flash", "efficient", "engine"]
    lengths = [n for r in rows for n in r["lengths"]]
    assert len(set(lengths)) == len(lengths) == 10  # no backend meets a shape another one built first
    assert all(r["equal_prompts_us"] > 0 and len(r["first_ms"]) == 2 for r in rows)
    assert rows[2]["masked_first_ms"] is None  # flash takes no mask: reported, not a failure
