"""CPU tests of the atom::w4a4_gemm torch op: argument checks, fake impl, opcheck, GPU-layout checks."""

from __future__ import annotations

import pytest
import torch

import atom_ops
from atom_ops import formats, kernels
from atom_ops.formats import FormatError, QuantSpec
from generator.configs import KernelConfig


def operands(m=5, n=32, spec=QuantSpec(576, 128, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = formats.quantize_operand(torch.randn(m, spec.k, generator=g), spec)
    w = formats.quantize_operand(torch.randn(n, spec.k, generator=g), spec)
    return a, w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_cpu_op_matches_reference(dtype, residual):
    a, w = operands()
    res = torch.randn(5, 32).to(dtype) if residual else None
    got = atom_ops.w4a4_gemm(a, w, dtype, res)
    assert got.dtype == dtype and got.shape == (5, 32)
    assert torch.equal(got, formats.w4a4_matmul_reference(a, w, dtype, res))


def test_m_equals_one_and_no_outliers():
    a, w = operands(m=1, n=16, spec=QuantSpec(256, 64, 0))
    assert torch.equal(atom_ops.w4a4_gemm(a, w), formats.w4a4_matmul_reference(a, w))


def test_argument_errors_are_clear():
    a, w = operands()
    with pytest.raises(FormatError, match="does not match weight spec"):
        atom_ops.w4a4_gemm(a, operands(spec=QuantSpec(576, 64, 64))[1])
    with pytest.raises(FormatError, match="out_dtype"):
        atom_ops.w4a4_gemm(a, w, torch.float32)
    with pytest.raises(FormatError, match="residual shape"):
        atom_ops.w4a4_gemm(a, w, torch.float16, torch.zeros(5, 31, dtype=torch.float16))
    with pytest.raises(FormatError, match="residual must be"):
        atom_ops.w4a4_gemm(a, w, torch.float16, torch.zeros(5, 32, dtype=torch.bfloat16))
    bad = formats.QuantizedTensor(a.packed.to(torch.int8), a.outlier, a.scale, a.spec)
    with pytest.raises(FormatError, match="activation.packed"):
        atom_ops.w4a4_gemm(bad, w)
    bad = formats.QuantizedTensor(w.packed, w.outlier, w.scale.float(), w.spec)
    with pytest.raises(FormatError, match="weight.scale"):
        atom_ops.w4a4_gemm(a, bad)


def test_fake_impl_shapes():
    a, w = operands(m=7, n=48)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fa = [mode.from_tensor(t) for t in (a.packed, a.outlier, a.scale, w.packed, w.outlier, w.scale)]
        out = torch.ops.atom.w4a4_gemm(*fa, 128, torch.bfloat16, None)
        assert out.shape == (7, 48) and out.dtype == torch.bfloat16


def test_opcheck():
    a, w = operands(m=3, n=16)
    res = torch.randn(3, 16).half()
    for r in (None, res):
        torch.library.opcheck(torch.ops.atom.w4a4_gemm.default,
                              (a.packed, a.outlier, a.scale, w.packed, w.outlier, w.scale, 128, torch.float16, r))


ATOM_OPS = ("w4a4_gemm", "quantized_linear", "quantize_activation", "apply_rope", "kv4_append",
            "kv4_decode_attention", "paged_decode_attention", "kv4_gather", "kv4_prefill_attention")


@pytest.mark.parametrize("name", ATOM_OPS)
def test_ops_are_registered_without_custom_op_layers(name):
    """atom_ops.registration: one kernel for every backend, no Python autograd layer (custom_op's
    per-call cost), a fake impl for meta / fake tensors, and kv4_append's schema marks its pools."""
    qualname = f"atom::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")
    schema = getattr(torch.ops.atom, name).default._schema
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == (
        ["k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero"] if name == "kv4_append" else [])


def test_op_without_backward_never_passes_gradients():
    """No autograd formula: forward runs under autograd; backward warns (torch's default autograd
    fallback, deprecated by torch) or raises, and never produces a gradient."""
    a, w = operands(m=2, n=16)
    x = torch.randn(2, w.spec.k, requires_grad=True)
    y = atom_ops.quantized_linear(x, w)  # the reference on the CPU, below autograd
    assert y.shape == (2, 16) and y.requires_grad
    try:
        with pytest.warns(UserWarning, match="autograd kernel was not registered"):
            y.float().sum().backward()
    except RuntimeError as e:
        assert "autograd" in str(e).lower()
    assert x.grad is None


def test_kernels_bridge_on_cpu():
    a, w = operands()
    assert kernels.w4a4_gemm(a, w, torch.float16, None) is None  # CPU: the reference runs
    with pytest.raises(FormatError, match="needs CUDA tensors"):
        kernels.w4a4_gemm(a, w, torch.float16, None, kernel="atom_w4a4_mma_sm80_t16x64x64_w16x16_s6_sk_gany_oany_f16")
    assert isinstance(kernels.kernel_names(), list)


def test_gpu_layout_checks():
    a, w = operands(n=40, spec=QuantSpec(4096, 128, 128))
    with pytest.raises(FormatError, match="N % 16"):
        kernels.check_gpu_args(a, w, None)
    a, w = operands(n=32, spec=QuantSpec(4096 + 16, 128, 16 + 128))
    with pytest.raises(FormatError, match="outliers % 32"):
        kernels.check_gpu_args(a, w, None)
    a, w = operands(n=32, spec=QuantSpec(96 * 40 + 64, 96, 64))
    with pytest.raises(FormatError, match="group % 64"):
        kernels.check_gpu_args(a, w, None)
    a, w = operands(n=32, spec=QuantSpec(4096, 128, 128))
    nc = formats.QuantizedTensor(a.packed, a.outlier, a.scale.t().contiguous().t(), a.spec)
    with pytest.raises(FormatError, match="contiguous"):
        kernels.check_gpu_args(nc, w, None)
    kernels.check_gpu_args(a, w, None)


@pytest.mark.skipif(not kernels.available(), reason="extension not built")
def test_extension_lists_and_plans():
    ext = kernels.extension()
    names = ext.kernel_names()
    assert names and len(names) == len(set(names))
    info = ext.kernels()
    assert {k["name"] for k in info} == set(names)
    for k in info:  # the registry's metadata is the config's (callers read it, not the name)
        cfg = KernelConfig.from_name(k["name"])
        assert (k["family"], k["split_k"], k["weight_fragments"]) == (cfg.family, cfg.split_k, cfg.weights == "frag4")
        assert kernels.kernel_info(k["name"]) == k and kernels.uses_weight_fragments(k["name"]) == k["weight_fragments"]
    with pytest.raises(FormatError, match="no compiled kernel named"):
        kernels.kernel_info("atom_w4a4_nope")
    cc = 80 if any(k["arch"] == "sm80" for k in info) else info[0]["min_cc"]
    name, split = ext.plan("", 1, 4096, 4096, 128, 128, 0, 0, cc)
    assert name in names and split >= 1
    with pytest.raises(ValueError, match="no compiled kernel"):
        ext.plan("nope", 1, 4096, 4096, 128, 128, 0, 0, cc)
    with pytest.raises(ValueError, match="N must be a multiple of 16"):
        ext.plan(name, 1, 4000 + 8, 4096, 128, 128, 0, 0, cc)
    assert ext.arch_for(70) == ""
