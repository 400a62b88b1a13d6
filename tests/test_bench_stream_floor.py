"""bench.stream_floor without a GPU: its probe kernel compiles (nvcc), and the bench says it needs CUDA."""

import shutil
import subprocess

import pytest
import torch

from bench import stream_floor


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_probe_kernel_compiles(tmp_path):
    src = tmp_path / "probe.cu"
    src.write_text(stream_floor.PROBE_CUDA)
    done = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_80", "-c", str(src), "-o", str(tmp_path / "probe.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_needs_cuda(capsys):
    assert stream_floor.main([]) == 2
    assert "CUDA" in capsys.readouterr().err
