"""The fused activation quantization op (atom_ops/quant_ops.py) and the CUDA staging kernel.

CPU: the op's reference path, the prologue references against the model's modules, errors.
GPU (`gpu` marker): the CUDA kernel against the reference over many shapes (bit-exact for the
"none" and "silu_mul" prologues), its staged output against atom_ops.staging, and opcheck.
Memcheck on a few cases of every prologue, dtype and launch shape:
    compute-sanitizer --tool memcheck python tests/test_quant_ops.py --sanitize
"""

from __future__ import annotations

import random

import pytest
import torch

import atom_ops
from atom_ops import formats, kernels, quant_ops, staging
from atom_ops.formats import FormatError, QuantSpec
from models.llama import RMSNorm


def _case(m, spec, prologue, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    cols = 2 * spec.k if prologue == "silu_mul" else spec.k
    x = (torch.randn(m, cols, generator=g) * 2).to(dtype)
    x[:, : min(cols, 5)] *= 30  # a few large channels, wherever the permutation puts them
    perm = torch.randperm(spec.k, generator=g)
    weight = (1 + 0.1 * torch.randn(spec.k, generator=g)).to(dtype)
    return x.to(device), perm.to(device), weight.to(device)


def _reference(x, spec, perm, clip, prologue, weight, eps=1e-5):
    return formats.quantize_activation(quant_ops.prologue_reference(x, prologue, weight, eps), spec, perm, clip)


def test_prologue_references_match_the_model():
    x = torch.randn(3, 64, dtype=torch.float16)
    norm = RMSNorm(64, eps=1e-6).half()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    assert torch.equal(quant_ops.rmsnorm_reference(x, norm.weight, 1e-6), norm(x))
    gu = torch.randn(3, 128, dtype=torch.float16)
    assert torch.equal(quant_ops.silu_mul_reference(gu), torch.nn.functional.silu(gu[:, :64]) * gu[:, 64:])


@pytest.mark.parametrize("prologue", quant_ops.PROLOGUE_NAMES)
def test_op_reference_path_on_cpu(prologue):
    spec = QuantSpec(576, 128, 64)
    x, perm, weight = _case(5, spec, prologue, torch.float32, "cpu", 1)
    got = quant_ops.quantize_activation(x, spec, perm, 0.9, prologue, weight)
    want = _reference(x, spec, perm, 0.9, prologue, weight)
    for f in ("packed", "outlier", "scale"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_op_errors_name_the_problem():
    spec = QuantSpec(576, 128, 64)
    x = torch.randn(2, 576)
    with pytest.raises(FormatError, match="prologue"):
        quant_ops.quantize_activation(x, spec, prologue="gelu")
    with pytest.raises(FormatError, match="expected 1152"):
        quant_ops.quantize_activation(x, spec, prologue="silu_mul")
    with pytest.raises(FormatError, match="norm_weight"):
        quant_ops.quantize_activation(x, spec, prologue="rmsnorm")
    with pytest.raises(FormatError, match="permutation"):
        quant_ops.quantize_activation(x, spec, perm=torch.arange(10))
    with pytest.raises(FormatError, match="clip"):
        quant_ops.quantize_activation(x, spec, clip=1.5)
    with pytest.raises(FormatError, match="2-D"):
        quant_ops.quantize_activation(x[0], spec)


def _saved(t: torch.Tensor) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_int32_perm_is_kept_until_the_permutation_changes():
    """The kernel's int32 copy of a model's int64 permutation is made once, not per call, and
    remade after any in-place write (directly or through a view)."""
    cpu = torch.device("cpu")
    perm = torch.randperm(64)
    first = kernels.int32_perm(perm, cpu)
    assert first.dtype == torch.int32 and first.is_contiguous() and torch.equal(first.long(), perm)
    assert kernels.int32_perm(perm, cpu) is first
    perm[:2] = perm[:2].flip(0).clone()
    second = kernels.int32_perm(perm, cpu)
    assert second is not first and torch.equal(second.long(), perm)
    perm.view(8, 8)[3].copy_(perm.view(8, 8)[3].flip(0))
    assert torch.equal(kernels.int32_perm(perm, cpu).long(), perm)
    import copy
    import io

    # copies carry the cached entry along and restart the version counter, so a copy of a tensor
    # written to after its last conversion could match a stale entry by version alone
    for make_twin in (copy.deepcopy, lambda t: torch.load(io.BytesIO(_saved(t)))):
        fresh = torch.randperm(64)
        fresh[:2] = fresh[:2].flip(0).clone()
        kernels.int32_perm(fresh, cpu)
        fresh[2:4] = fresh[2:4].flip(0).clone()
        twin = make_twin(fresh)
        assert torch.equal(kernels.int32_perm(twin, cpu).long(), twin)
    plain = perm.int()
    assert kernels.int32_perm(plain, cpu) is plain
    with torch.inference_mode():  # no version counter: converted every time, never stale
        frozen = torch.randperm(16)
        frozen_32 = kernels.int32_perm(frozen, cpu)
        assert torch.equal(frozen_32.long(), frozen)
        frozen[:] = frozen.flip(0)
        assert torch.equal(kernels.int32_perm(frozen, cpu).long(), frozen)


def test_opcheck_cpu():
    spec = QuantSpec(576, 128, 64)
    x, perm, weight = _case(3, spec, "rmsnorm", torch.float32, "cpu", 2)
    torch.library.opcheck(torch.ops.atom.quantize_activation.default, (x, perm, weight, 1e-5, 1, 576, 128, 64, 0.9))


# ------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available(),
                               reason="needs a CUDA GPU and the compiled extension atom_ops._C")


def _gpu_cases(n=120, seed=0):
    rng = random.Random(seed)
    ks = (576, 1536, 4096, 5120, 11008, 14336)
    out = []
    for i in range(n):
        k = ks[i % len(ks)]
        specs = [QuantSpec(k, g, o) for g in (64, 128) for o in (0, 64, 128) if k - o > 0 and (k - o) % g == 0]
        spec = rng.choice(specs)
        m = rng.choice([1, 2, 3, 7, 16, 33, 100, 257, 1100])  # 1100: more rows than resident CTAs (L2 prefetch)
        prologue = quant_ops.PROLOGUE_NAMES[i % 3]
        dtype = (torch.float16, torch.bfloat16, torch.float32)[(i // 3) % 3]
        out.append((m, spec, prologue, dtype, rng.choice([1.0, 0.9])))
    return out


@pytest.mark.gpu
@needs_gpu
def test_kernel_matches_reference():
    bad = []
    flips = total = 0
    for i, (m, spec, prologue, dtype, clip) in enumerate(_gpu_cases()):
        x, perm, weight = _case(m, spec, prologue, dtype, "cuda", 100 + i)
        if i % 4 == 3:  # no permutation: a split row's CTA stages only its own columns
            perm = None
        staged = spec.group == 128
        got, st = kernels.quantize_rows(x, spec, perm, clip, prologue, weight, 1e-5, staged=staged)
        want = _reference(x, spec, perm, clip, prologue, weight)
        if prologue == "rmsnorm":
            # rstd may differ in the last bit (sum order): a value on a rounding boundary moves one step.
            d = (got.int_values().int() - want.int_values().int()).abs()
            flips += int((d > 0).sum())
            total += d.numel()
            if d.max() > 1 or (got.scale.float() - want.scale.float()).abs().max() > 1e-3 * want.scale.float().abs().max():
                bad.append(f"{i} {prologue} M={m} {spec} {dtype}: max step {int(d.max())}")
            continue
        for f in ("packed", "outlier", "scale"):
            if not torch.equal(getattr(got, f), getattr(want, f)):
                bad.append(f"{i} {prologue} M={m} {spec} {dtype} clip={clip}: {f} differs")
        if staged:
            ref = staging.stage_operand(want)
            if not (torch.equal(st.values.view(torch.uint8), ref.values.view(torch.uint8))
                    and torch.equal(st.scale, ref.scale)):
                bad.append(f"{i} staged output differs for M={m} {spec}")
    assert not bad, "\n".join(bad[:20])
    assert flips <= 1e-3 * max(total, 1), (flips, total)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_rounds_exact_ties_to_even(dtype):
    """Values whose quotient by their group's scale is exactly k + 1/2: the kernel multiplies by the
    scale's reciprocal and must take its exact-division fallback there (round half to even), for
    the INT4 groups (halves in [-7, 7] with a 7 in every group: scale 1) and the INT8 outlier group
    (eighths in [-31.75, 31.75] with 31.75 present: scale 1/4, quotients on halves)."""
    spec, m = QuantSpec(4096, 128, 128), 8
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-14, 15, (m, spec.k), generator=g) / 2.0
    x[:, :spec.k_normal:spec.group] = 7.0
    x[:, spec.k_normal:] = torch.randint(-254, 255, (m, spec.outliers), generator=g) / 8.0
    x[:, spec.k_normal] = 31.75
    x = x.to(dtype).cuda()
    perm = torch.arange(spec.k, device="cuda")
    got, _ = kernels.quantize_rows(x, spec, perm, 1.0, "none")
    want = _reference(x, spec, perm, 1.0, "none", None)
    assert torch.equal(want.scale.float().unique().cpu(), torch.tensor([0.25, 1.0]))  # the ties are real
    for f in ("packed", "outlier", "scale"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


@pytest.mark.gpu
@needs_gpu
def test_staged_only_output_and_launch_helpers():
    """quantize_rows(packed=False) writes the staged operand alone (the wgmma path of
    quantized_linear), bit for bit the one written next to the packed format; the extension
    refuses a call with no output or half a packed one; kernels.raw_stream / on_device give
    torch's current stream and device."""
    assert kernels.extension().QUANTIZE_STAGED_ONLY
    cases = [("none", 128, 37, torch.float16, True), ("rmsnorm", 0, 300, torch.bfloat16, True),
             ("silu_mul", 64, 37, torch.float16, False), ("none", 128, 1, torch.float32, False)]
    for i, (prologue, o, m, dtype, with_perm) in enumerate(cases):
        spec = QuantSpec(1024 + o, 128, o)
        x, perm, weight = _case(m, spec, prologue, dtype, "cuda", 900 + i)
        perm = perm if with_perm else None  # no permutation: the kernel's contiguous-row instantiation
        full, st_full = kernels.quantize_rows(x, spec, perm, 0.9, prologue, weight, 1e-5, staged=True)
        none, st = kernels.quantize_rows(x, spec, perm, 0.9, prologue, weight, 1e-5, staged=True, packed=False)
        assert none is None and full is not None
        assert torch.equal(st.values, st_full.values) and torch.equal(st.scale, st_full.scale), prologue
    with pytest.raises(FormatError, match="nothing to write"):
        kernels.quantize_rows(x, spec, perm, 0.9, prologue, weight, staged=False, packed=False)
    ext, dev = kernels.extension(), x.device
    stream = kernels.raw_stream(dev)
    xs = torch.randn(1, 1152, device=dev, dtype=torch.float16)
    scratch = torch.empty(4096, dtype=torch.uint8, device=dev)  # a valid target, should a check regress
    p = scratch.data_ptr()
    # (packed, outlier, scale, staged, outliers, why): no output at all; half a packed output
    for packed, outlier, scale, staged, o, why in ((0, 0, 0, 0, 0, "no output"), (p, 0, 0, 0, 0, "given whole"),
                                                   (0, 0, p, 0, 0, "given whole"), (p, 0, p + 2048, 0, 128, "given whole")):
        with pytest.raises(ValueError, match=why):
            ext.quantize_rows(xs.data_ptr(), 0, xs.stride(0), 0, 0, 1e-5, 0, 1.0, 1, 1024 + o, 128, o, packed, outlier,
                              scale, staged, 0, 0, stream)
    torch.cuda.synchronize()
    assert stream == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        assert kernels.raw_stream(dev) == side.cuda_stream != stream
    with kernels.on_device(dev), kernels.on_device(torch.device("cuda")):  # (one GPU: the no-switch branch)
        assert torch.cuda.current_device() == dev.index
    assert kernels.raw_stream(torch.device("cuda")) == stream


def _check_kernel(m, spec, prologue, dtype, clip, x, perm, weight, staged) -> list[str]:
    """The kernel's outputs against the reference: bit-exact, RMSNorm within one step (rstd's last bit)."""
    got, st = kernels.quantize_rows(x, spec, perm, clip, prologue, weight, 1e-5, staged=staged)
    want = _reference(x, spec, perm, clip, prologue, weight)
    name = f"{prologue} M={m} {spec} {dtype} clip={clip}"
    if prologue == "rmsnorm":
        d = (got.int_values().int() - want.int_values().int()).abs()
        bad = d.max() > 1 or int((d > 0).sum()) > max(1, 1e-3 * d.numel())
        return [f"{name}: max step {int(d.max())}, {int((d > 0).sum())} flips"] if bad else []
    bad = [f"{name}: {f} differs" for f in ("packed", "outlier", "scale") if not torch.equal(getattr(got, f), getattr(want, f))]
    if staged and not bad:
        ref = staging.stage_operand(want)
        if not (torch.equal(st.values.view(torch.uint8), ref.values.view(torch.uint8)) and torch.equal(st.scale, ref.scale)):
            bad.append(f"{name}: staged output differs")
    return bad


def _odd_cases(device="cuda"):
    """Many outliers (beyond the 128 kept in registers), tiny K, and perm / weight / x at odd
    element offsets (the kernel's scalar paths)."""
    for i, (spec, prologue, dtype, variant) in enumerate(
            (spec, prologue, dtype, variant)
            for spec in (QuantSpec(1280, 128, 256), QuantSpec(2048, 64, 1024), QuantSpec(96, 64, 32))
            for prologue in quant_ops.PROLOGUE_NAMES for dtype in (torch.float16, torch.bfloat16) for variant in range(3)):
        m = 3
        x, perm, weight = _case(m, spec, prologue, dtype, device, 700 + i)
        perm = perm.to(torch.int32)
        if variant == 1:  # perm and weight one element into a larger buffer: not 16-byte aligned
            pb = torch.zeros(spec.k + 1, dtype=torch.int32, device=device)
            pb[1:] = perm
            perm = pb[1:]
            wb = torch.zeros(spec.k + 1, dtype=dtype, device=device)
            wb[1:] = weight
            weight = wb[1:]
        elif variant == 2:  # x likewise
            xb = torch.zeros(x.numel() + 1, dtype=dtype, device=device)
            xb[1:] = x.flatten()
            x = xb[1:].view(m, -1)
        yield m, spec, prologue, dtype, 0.9, x, perm, weight


@pytest.mark.gpu
@needs_gpu
def test_kernel_odd_layouts():
    bad = []
    for case in _odd_cases():
        bad += _check_kernel(*case, staged=case[1].group == 128)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("k, outliers", [(576, 64), (4096, 128), (1536, 0), (640, 256)])
def test_stage_kernel_matches_staging_reference(k, outliers):
    spec = QuantSpec(k, 128, outliers)
    x = torch.randn(37, k, device="cuda")
    x[:, spec.k_normal:] *= 50
    a = formats.quantize_operand(x, spec, clip=0.9)
    got, ref = kernels.stage_activation(a), staging.stage_operand(a)
    assert torch.equal(got.values.view(torch.uint8), ref.values.view(torch.uint8))
    assert torch.equal(got.scale, ref.scale)


@pytest.mark.gpu
@needs_gpu
def test_opcheck_cuda():
    spec = QuantSpec(4096, 128, 128)
    x, perm, weight = _case(5, spec, "rmsnorm", torch.float16, "cuda", 3)
    torch.library.opcheck(torch.ops.atom.quantize_activation.default, (x, perm, weight, 1e-5, 1, 4096, 128, 128, 0.9))


# ------------------------------------------------------------- quantized_linear (quantize + GEMM)

def _weight(n, spec, seed):
    g = torch.Generator().manual_seed(seed)
    return formats.quantize_operand(torch.randn(n, spec.k, generator=g), spec, clip=0.85)


@pytest.mark.parametrize("prologue", quant_ops.PROLOGUE_NAMES)
def test_quantized_linear_is_quantize_then_gemm_on_cpu(prologue):
    spec = QuantSpec(576, 128, 64)
    x, perm, weight = _case(5, spec, prologue, torch.float32, "cpu", 4)
    w, res = _weight(48, spec, 5), torch.randn(5, 48).half()
    got = atom_ops.quantized_linear(x, w, perm, 0.9, prologue, weight, 1e-5, torch.float16, res)
    want = formats.w4a4_matmul_reference(_reference(x, spec, perm, 0.9, prologue, weight), w, torch.float16, res)
    assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.atom.quantized_linear.default,
                          (x, perm, weight, 1e-5, quant_ops.PROLOGUE_NAMES.index(prologue), 0.9, w.packed, w.outlier,
                           w.scale, 128, torch.float16, res))


def test_quantized_linear_errors_name_the_problem():
    spec = QuantSpec(576, 128, 64)
    x, w = torch.randn(3, 576), _weight(32, spec, 6)
    with pytest.raises(FormatError, match="residual shape"):
        atom_ops.quantized_linear(x, w, residual=torch.zeros(3, 31, dtype=torch.float16))
    with pytest.raises(FormatError, match="residual must be"):
        atom_ops.quantized_linear(x, w, residual=torch.zeros(3, 32))
    with pytest.raises(FormatError, match="out_dtype"):
        atom_ops.quantized_linear(x, w, out_dtype=torch.float32)
    with pytest.raises(FormatError, match="expected 576"):
        atom_ops.quantized_linear(torch.randn(3, 512), w)
    with pytest.raises(FormatError, match="weight.packed"):
        atom_ops.quantized_linear(x, formats.QuantizedTensor(w.packed[:, :10], w.outlier, w.scale, spec))


@pytest.mark.gpu
@needs_gpu
def test_quantized_linear_kernels_match_reference():
    """The fused path (quantization kernel writing the GEMM's operand, staged on sm90a, then the
    dispatched GEMM with the residual in its epilogue) against the reference GEMM on the kernel's own
    quantized activation (the RMSNorm kernel may move a value by one step; its own test bounds that)."""
    from test_gemm_gpu import compare
    rng = random.Random(7)
    cases = [(m, rng.choice([128, 512, 1536]), rng.choice([(576, 64), (4096, 128), (1536, 0)]),
              rng.choice(quant_ops.PROLOGUE_NAMES), rng.choice([torch.float16, torch.bfloat16]), rng.random() < 0.5)
             for m in (1, 3, 16, 64, 77, 300, 1100) for _ in range(3)]
    for i, (m, n, (k, outliers), prologue, dtype, residual) in enumerate(cases):
        spec = QuantSpec(k, 128, outliers)
        x, perm, weight = _case(m, spec, prologue, dtype, "cuda", 50 + i)
        w = _weight(n, spec, 80 + i).to("cuda")
        res = torch.randn(m, n, device="cuda").to(dtype) if residual else None
        got = atom_ops.quantized_linear(x, w, perm, 0.9, prologue, weight, 1e-5, dtype, res)
        a = quant_ops.quantize_activation(x, spec, perm, 0.9, prologue, weight)
        _, max_rel, nbad, _ = compare(got, formats.w4a4_matmul_reference(a, w, dtype, res), dtype)
        assert nbad == 0, (m, n, spec, prologue, dtype, residual, max_rel)


# ------------------------------------------------------------------------- sanitizer

def sanitize_main() -> int:
    """A few cases per prologue, dtype and launch shape (split rows at small M, 512- and 256-thread
    CTAs, the L2 prefetch of later rows at large M, scalar paths), for
    `compute-sanitizer --tool memcheck python tests/test_quant_ops.py --sanitize`."""
    bad = []
    n = 0
    for i, (m, k, group, outliers) in enumerate([(1, 4096, 128, 128), (16, 14336, 128, 128), (3, 576, 64, 64),
                                                 (300, 1536, 128, 0), (700, 576, 64, 64)]):
        spec = QuantSpec(k, group, outliers)
        for j, prologue in enumerate(quant_ops.PROLOGUE_NAMES):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x, perm, weight = _case(m, spec, prologue, dtype, "cuda", 900 + 10 * i + j)
                for p in (perm, None):
                    bad += _check_kernel(m, spec, prologue, dtype, 0.9, x, p, weight, staged=group == 128)
                    n += 1
    for case in _odd_cases():
        bad += _check_kernel(*case, staged=case[1].group == 128)
        n += 1
    torch.cuda.synchronize()
    print(f"sanitize quantize_rows: {n} cases,", "FAIL:\n" + "\n".join(bad) if bad else "ok")
    return (1 if bad else 0) | sanitize_baseline_kernels()


def sanitize_baseline_kernels() -> int:
    """The fp16 / fp8 baselines' kernels (fp8_quantize_rows plain and with SiLU, silu_mul) on vector and
    scalar paths and both sides of the staged row's shared-memory limit, against their torch references."""
    from models.engine.fp8 import quantize_fp8_rows_reference

    bad = []
    g = torch.Generator(device="cpu").manual_seed(7)
    for m, k, start, dtype in ((1, 11008, 0, torch.float16), (64, 4096, 1, torch.float16), (5, 12224, 0, torch.float32),
                               (3, 24449, 0, torch.bfloat16), (9, 100, 1, torch.bfloat16)):
        x = torch.randn(m, start + 2 * k, generator=g).to("cuda", dtype)[:, start:]
        want = quant_ops.silu_mul_reference(x)
        checks = {"silu_mul": torch.equal(kernels.silu_mul(x), want)}
        for name, fused, ref in (("fp8", kernels.fp8_quantize_rows(x), quantize_fp8_rows_reference(x)),
                                 ("fp8 silu", kernels.fp8_quantize_rows(x, silu_mul=True), quantize_fp8_rows_reference(want))):
            checks[name] = torch.equal(fused[0].view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(fused[1], ref[1])
        bad += [f"{name} M={m} K={k} start={start} {dtype}" for name, ok in checks.items() if not ok]
    torch.cuda.synchronize()
    print("sanitize baseline kernels: 15 cases,", "FAIL:\n" + "\n".join(bad) if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    from sanitize import run_if_asked
    run_if_asked(sanitize_main)
