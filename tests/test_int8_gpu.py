"""The int8 family (plain CUTLASS INT8 GEMM emitted by our generator, the GEMM bench's ceiling):
argument checks on the CPU, and on a GPU every compiled int8 kernel that runs there against an
exact reference over ~20 shapes (odd M, M = 1, the Llama K values), plus CUDA-graph capture.

    pytest -m gpu tests/test_int8_gpu.py -v        # after building the extension
"""

from __future__ import annotations

import pytest
import torch

from atom_ops import kernels
from atom_ops.formats import FormatError

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.int8_kernels_info(),
                               reason="needs a CUDA GPU and the extension with the int8 family")

# (M, N, K): M = 1, odd M, tile edges (128 x 256), K from 16 to 14336, N % 16 == 0.
SHAPES = [(1, 16, 16), (1, 4096, 4096), (2, 48, 32), (3, 272, 576), (7, 960, 576), (15, 1536, 1536),
          (16, 576, 1536), (17, 4096, 11008), (31, 12288, 4096), (33, 1024, 14336), (64, 256, 128),
          (127, 512, 4096), (128, 256, 64), (129, 257 // 16 * 16 + 16, 272), (200, 11008, 4096),
          (255, 4096, 5120), (257, 6144, 4096), (300, 8192, 512), (513, 4096, 4096), (1024, 1024, 2048),
          (2048, 4096, 11008)]


def _operands(m, n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    return a, b


def _reference(a, b):
    # float64 is exact here: |sum| <= 128 * 128 * 14336 < 2**53.
    return (a.double() @ b.double().t()).round().to(torch.int64)


def test_int8_gemm_argument_checks_cpu():
    a = torch.zeros(4, 32, dtype=torch.int8)
    b = torch.zeros(16, 32, dtype=torch.int8)
    with pytest.raises(FormatError, match="CUDA"):
        kernels.int8_gemm(a, b)
    with pytest.raises(FormatError, match="int8"):
        kernels.int8_gemm(a.float(), b)
    with pytest.raises(FormatError, match="2-D"):
        kernels.int8_gemm(a[None], b)
    with pytest.raises(TypeError):
        kernels.int8_gemm(a.numpy(), b)


@pytest.mark.gpu
@needs_gpu
def test_int8_gemm_argument_checks_gpu():
    a, b = _operands(4, 32, 32)
    with pytest.raises(FormatError, match="K % 16"):
        kernels.int8_gemm(a[:, :24].contiguous(), b[:, :24].contiguous())
    with pytest.raises(FormatError, match="N % 16"):
        kernels.int8_gemm(a, b[:24].contiguous())
    with pytest.raises(FormatError, match="b must be"):
        kernels.int8_gemm(a, b[:, :16].contiguous())
    with pytest.raises(FormatError, match="contiguous"):
        kernels.int8_gemm(a, torch.zeros(32, 32, dtype=torch.int8, device="cuda").t())
    with pytest.raises(FormatError, match="no compiled int8 kernel named"):
        kernels.int8_gemm(a, b, kernel="atom_int8_gemm_nope")


def _runnable():
    if not torch.cuda.is_available():
        return []
    major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    return [k["name"] for k in kernels.int8_kernels_info() if k["min_cc"] <= cc <= k["max_cc"]]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel", _runnable() or [None])
def test_int8_gemm_exact(kernel):
    if kernel is None:
        pytest.skip("no int8 kernel runs on this GPU")
    for i, (m, n, k) in enumerate(SHAPES):
        a, b = _operands(m, n, k, seed=i)
        out = torch.full((m, n), -(2**31), dtype=torch.int32, device="cuda")  # poison: unwritten fails
        kernels.int8_gemm(a, b, kernel=kernel, out=out)
        torch.cuda.synchronize()
        ref = _reference(a, b)
        bad = (out.long() != ref).sum().item()
        assert bad == 0, f"{kernel} M={m} N={n} K={k}: {bad} of {m * n} wrong"


@pytest.mark.gpu
@needs_gpu
def test_int8_gemm_default_matches_int_mm_and_graph():
    a, b = _operands(256, 4096, 4096, seed=7)
    out = kernels.int8_gemm(a, b)
    assert out.dtype == torch.int32 and out.shape == (256, 4096)
    assert torch.equal(out, torch._int_mm(a, b.t()))
    name = kernels.int8_kernel_for(256, 4096, 4096)
    assert name.startswith("atom_int8_gemm_")
    static = torch.empty_like(out)
    kernels.int8_gemm(a, b, out=static)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        kernels.int8_gemm(a, b, out=static)
    static.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, out)
