"""bench.baseline_ops without a GPU: its cases follow the model configs, unknown ops are named, and
the bench says it needs CUDA."""

import pytest
import torch

from bench import baseline_ops


def test_cases_cover_every_op_at_the_model_widths():
    got = list(baseline_ops.cases(["llama-7b", "llama-3-8b"]))
    assert got == [("llama-7b", "rmsnorm", 4096), ("llama-7b", "silu_mul", 11008), ("llama-7b", "fp8_silu", 11008),
                   ("llama-3-8b", "rmsnorm", 4096), ("llama-3-8b", "silu_mul", 14336),
                   ("llama-3-8b", "fp8_silu", 14336)]
    assert {op for _, op, _ in got} == set(baseline_ops.OPS)


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="unknown op 'gelu'"):
        baseline_ops.op_pair("gelu", 1, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_needs_cuda(capsys):
    assert baseline_ops.main([]) == 2
    assert "CUDA" in capsys.readouterr().err
