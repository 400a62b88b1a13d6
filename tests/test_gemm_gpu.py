"""GPU tests of the compiled W4A4 kernels against atom_ops.formats.w4a4_matmul_reference.

Run on a GPU machine after building the extension (see the report / README):
    pytest -m gpu tests/test_gemm_gpu.py -v
Memcheck on a few shapes:
    compute-sanitizer --tool memcheck python tests/test_gemm_gpu.py --sanitize
Every compiled kernel that runs on the device is forced by name over every random shape of
its output dtype (outputs poisoned with NaN first, so unwritten elements fail), and the
dispatch path (the torch op) runs too; the wgmma kernels (stock and overlapped promotion)
also run at prefill sizes. Tolerance: float summation order only; the wgmma kernels and the
mma family's multistage tiles without split-K must be bit-exact (must_be_exact).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from atom_ops import formats, kernels, staging
from atom_ops.formats import QuantSpec

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available(),
                               reason="needs a CUDA GPU and the compiled extension atom_ops._C")

K_VALUES = (576, 1536, 4096, 5120, 11008, 14336)
N_SHAPES = 220
# Output rounding: allow 1 ulp of the output dtype (rtol) plus float32 summation-order noise
# relative to the sum of |terms| (approximated by the output's max magnitude).
RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Kernels with the overlapped promotion (atom_wgmma_overlap.cuh) must equal the reference exactly.
OVERLAP = "_ovl_"


def must_be_exact(name: str) -> bool:
    """Kernels that promote each group as the reference does, in its order: the wgmma family's
    mainloop and the mma family's multistage tiles, both without split-K (the stream kernels split
    K across warps, split-K across CTAs: another summation order)."""
    if "_sk_" in name:  # built with split-K: another summation order (also at split 1, to be safe)
        return False
    return OVERLAP in name or ("_mma_" in name and "_stream" not in name)


def _specs(k: int):
    out = []
    for group in (64, 128):
        for o in (0, 64, 128):
            kn = k - o
            if kn > 0 and kn % group == 0:
                out.append(QuantSpec(k, group, o))
    return out


def random_cases(n: int, seed: int = 0):
    rng = random.Random(seed)
    ms = [1, 1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 65, 127, 128, 129, 200, 255, 257, 300, 513]
    cases = []
    for i in range(n):
        k = K_VALUES[i % len(K_VALUES)]
        spec = rng.choice(_specs(k))
        m = rng.choice(ms) if i % 3 else rng.randint(1, 400)
        nn = 16 * rng.randint(1, 160 if k >= 11008 else 256)
        dtype = (torch.float16, torch.bfloat16)[(i // len(K_VALUES)) % 2]
        residual = rng.random() < 0.5
        cases.append((m, nn, spec, dtype, residual))
    return cases


def make_operands(m, n, spec, dtype, residual, device="cuda", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, spec.k, generator=g)
    x[:, spec.k_normal:] *= 8  # outlier channels are larger
    w = torch.randn(n, spec.k, generator=g)
    a = formats.quantize_operand(x, spec, clip=0.9).to(device)
    wq = formats.quantize_operand(w, spec, clip=0.85).to(device)
    res = torch.randn(m, n, generator=g).to(dtype).to(device) * 4 if residual else None
    return a, wq, res


def compare(out, ref, dtype):
    """(max |err|, max |err| / max |ref|, number of out-of-tolerance or non-finite elements,
    fraction bit-exact)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    o, r = out.float(), ref.float()
    err = (o - r).abs()
    tol = RTOL[dtype] * r.abs() + 1e-5 * r.abs().max() + 1e-6
    bad = (err > tol) | ~torch.isfinite(o)  # NaN-poisoned outputs: an unwritten element is bad
    scale = float(r.abs().max()) or 1.0
    return float(err.max()), float(err.max()) / scale, int(bad.sum()), float((err == 0).float().mean())


@needs_gpu
def test_every_kernel_random_shapes():
    torch.backends.cuda.matmul.allow_tf32 = False
    runnable = kernels.runnable_kernels()
    assert runnable, "the extension has no kernel for this GPU"
    stats = {k["name"]: [0, 0.0, 1.0] for k in runnable}
    failures = []
    for i, (m, n, spec, dtype, residual) in enumerate(random_cases(N_SHAPES)):
        a, w, res = make_operands(m, n, spec, dtype, residual, seed=i)
        ref = formats.w4a4_matmul_reference(a, w, dtype, res)
        want = "f16" if dtype == torch.float16 else "bf16"
        runs = [("dispatch", "", 0)]
        for k in runnable:
            if k["out_dtype"] != want or spec.group % k["tile_k"] or spec.outliers % (k["tile_k"] // 2):
                continue
            if kernels.uses_weight_fragments(k["name"]) and n % k["tile_m"]:
                continue  # 64-row fragment blocks per tile (test_weight_fragment_kernels runs them more)
            # mma: any split; wgmma (_w4 split-K): every split keeps >= 2 staged k-tiles
            choices = [2, 3, 4, 7, 64] if k["family"] == "mma" else list(range(2, staging.max_split_k(spec) + 1))
            splits = [1] + ([random.Random(i).choice(choices)] if k["split_k"] and choices else [])
            runs += [(k["name"], k["name"], s) for s in splits]
        for label, name, split in runs:
            out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            got = kernels.w4a4_gemm(a, w, dtype, res, kernel=name, split_k=split, out=out)
            assert got is not None
            torch.cuda.synchronize()
            max_abs, max_rel, nbad, exact = compare(got, ref, dtype)
            if name:
                stats[name][0] += 1
                stats[name][1] = max(stats[name][1], max_rel)
                stats[name][2] = min(stats[name][2], exact)
            if nbad:
                failures.append(f"{label} split={split} M={m} N={n} {spec} {dtype} residual={residual}: "
                                f"{nbad} bad, max abs err {max_abs:.3g}")
            elif must_be_exact(name) and not torch.equal(got, ref):  # the reference's arithmetic, bit for bit
                failures.append(f"{label} M={m} N={n} {spec} {dtype} residual={residual}: "
                                f"{int((got != ref).sum())} elements differ from the reference")
    for name, (count, rel, exact) in sorted(stats.items()):
        print(f"{name}: {count} runs, max |err| / max |ref| = {rel:.3g}, worst bit-exact fraction {exact:.4f}")
    print(f"{N_SHAPES} shapes, {len(failures)} failures")
    assert not failures, "\n".join(failures[:20])
    assert all(v[0] > 0 for v in stats.values()), stats


# The _w4 kernels (4-bit weight fragments, RS wgmma) need N % tile_m == 0: their own shapes, all
# bit-exact; every awkward M, outliers 0 / 64 / 128, the Llama K values and a small one.
def weight_fragment_cases(n_cases: int, seed: int = 7):
    rng = random.Random(seed)
    ms = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 700]
    cases = []
    for i in range(n_cases):
        k = (576, 1536, 4096, 11008)[i % 4]
        spec = rng.choice([s for s in _specs(k) if s.group == 128])
        cases.append((rng.choice(ms), 128 * rng.randint(1, 48), spec, (torch.float16, torch.bfloat16)[i % 2],
                      rng.random() < 0.5))
    return cases


@needs_gpu
def test_weight_fragment_kernels():
    w4 = [k for k in kernels.runnable_kernels() if kernels.uses_weight_fragments(k["name"])]
    if not w4:
        pytest.skip("no _w4 kernel runs on this device (sm90a only)")
    failures, runs = [], 0
    for i, (m, n, spec, dtype, residual) in enumerate(weight_fragment_cases(80)):
        a, w, res = make_operands(m, n, spec, dtype, residual, seed=300 + i)
        ref = formats.w4a4_matmul_reference(a, w, dtype, res)
        want = "f16" if dtype == torch.float16 else "bf16"
        for k in (k for k in w4 if k["out_dtype"] == want):
            # split-K kernels: split 1 and one more (every split >= 2 k-tiles); other summation order
            top = staging.max_split_k(spec)
            splits = [1] + ([random.Random(i).randint(2, top)] if k["split_k"] and top >= 2 else [])
            for split in splits:
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                got = kernels.w4a4_gemm(a, w, dtype, res, kernel=k["name"], split_k=split, out=out)
                torch.cuda.synchronize()
                runs += 1
                nbad = compare(got, ref, dtype)[2]
                if nbad or (split == 1 and not torch.equal(got, ref)):
                    failures.append(f"{k['name']} split={split} M={m} N={n} {spec} {dtype} residual={residual}: "
                                    f"{nbad} out of tolerance, {int((got != ref).sum())} of {got.numel()} differ")
    print(f"_w4 kernels: {runs} runs, {len(failures)} failures")
    assert runs and not failures, "\n".join(failures[:20])
    # N not a multiple of the tile: the kernel says why, the dispatch never picks it
    a, w, _ = make_operands(5, 192, QuantSpec(576, 128, 64), torch.float16, False)
    tile128 = [k["name"] for k in w4 if k["tile_m"] == 128 and k["out_dtype"] == "f16"]
    for name in tile128:
        with pytest.raises(formats.FormatError, match="multiple of 128"):
            kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name)
    # split-K above half the k-tiles: refused with the reason (576 + 64 outliers: 5 k-tiles, at most 2)
    a, w, _ = make_operands(5, 256, QuantSpec(576, 128, 64), torch.float16, False)
    for name in (k["name"] for k in w4 if k["split_k"] and k["out_dtype"] == "f16"):
        with pytest.raises(formats.FormatError, match="at most half the k-tiles"):
            kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name, split_k=3)
        assert torch.equal(kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name, split_k=2).float(),
                           kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name, split_k=2).float())  # deterministic
        # CUDA-graph capture after an eager warm-up (torch.cuda.graph captures on its own stream:
        # the split-K workspace must already exist for it) and replay with new inputs.
        out = torch.empty((5, 256), dtype=torch.float16, device="cuda")
        kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name, split_k=2, out=out)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name, split_k=2, out=out)
        a2 = make_operands(5, 256, QuantSpec(576, 128, 64), torch.float16, False, seed=9)[0]
        for t, t2 in ((a.packed, a2.packed), (a.outlier, a2.outlier), (a.scale, a2.scale)):
            t.copy_(t2)
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name, split_k=2))


# Prefill sizes for the wgmma family (test_every_kernel_random_shapes stops at M = 513): many
# output tiles per persistent CTA, odd (35, 89) and even (32, 8) k-tile counts, which the
# overlapped-promotion mainloop (_ovl, two temporaries alternating by k-tile parity) must all get right.
LARGE_CASES = [(2048, 4096, QuantSpec(4096, 128, 128), True), (1000, 4096, QuantSpec(4096, 128, 0), False),
               (1536, 2048, QuantSpec(11008, 128, 128), True), (4096, 1024, QuantSpec(576, 128, 64), False)]


@needs_gpu
def test_wgmma_kernels_prefill_sizes():
    wg = [k for k in kernels.runnable_kernels() if k["family"] == "wgmma"]
    if not wg:
        pytest.skip("no wgmma-family kernel runs on this device (sm90a only)")
    names = {k["name"] for k in wg}
    failures = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for i, (m, n, spec, residual) in enumerate(LARGE_CASES):
        for dtype, want in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
            a, w, res = make_operands(m, n, spec, dtype, residual, seed=100 + i)
            ref = formats.w4a4_matmul_reference(a, w, dtype, res)
            for k in (k for k in wg if k["out_dtype"] == want):
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                got = kernels.w4a4_gemm(a, w, dtype, res, kernel=k["name"], out=out)
                torch.cuda.synchronize()
                max_abs, max_rel, nbad, exact = compare(got, ref, dtype)
                print(f"{k['name']} M={m} N={n} {spec} residual={residual}: max |err| / max |ref| = {max_rel:.3g}, "
                      f"bit-exact vs reference {exact:.4f}")
                if nbad:
                    failures.append(f"{k['name']} M={m} N={n} {spec}: {nbad} bad, max abs err {max_abs:.3g}")
                if must_be_exact(k["name"]) and not torch.equal(got, ref):
                    failures.append(f"{k['name']} M={m} N={n} {spec}: not bit-exact ({exact:.6f})")
    assert not failures, "\n".join(failures[:20])
    assert all(OVERLAP in n for n in names), "a wgmma kernel outside our mainloop was built"



# The wgmma family on its own shapes: test_every_kernel_random_shapes draws group 64 for about
# half its cases, which these kernels do not take (group 128 only), so here every case is group
# 128, run in both output dtypes. K values give every outlier count: 576 / 2112 / 4160 take only
# 64 outliers (K - 64 is a multiple of 128), the others 0 or 128. Half the N are multiples of 128,
# which the _w4 tiles need.
WGMMA_K_VALUES = (576, 640, 1536, 2112, 4096, 4160, 11008, 14336)
WGMMA_SHAPES = 240


def wgmma_cases(n_cases: int, seed: int = 11):
    rng = random.Random(seed)
    ms = [1, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 191, 255, 257, 383, 513, 777]
    cases = []
    for i in range(n_cases):
        k = WGMMA_K_VALUES[i % len(WGMMA_K_VALUES)]
        spec = rng.choice([s for s in _specs(k) if s.group == 128])
        m = rng.choice(ms) if i % 4 else rng.randint(1, 800)
        n = 128 * rng.randint(1, 40) if i % 2 else 16 * rng.randint(1, 300 if k < 11008 else 120)
        cases.append((m, n, spec, rng.random() < 0.5))
    return cases


def _wgmma_runs(kernels_of_dtype, n: int, spec, i: int):
    """(kernel, split) pairs for one case: every wgmma kernel of the dtype that takes the shape, at
    split 1, and split-K kernels at one more split (every split keeps >= 2 k-tiles)."""
    runs = []
    for k in kernels_of_dtype:
        if kernels.uses_weight_fragments(k["name"]) and n % k["tile_m"]:
            continue
        top = staging.max_split_k(spec)
        runs.append((k["name"], 1))
        if k["split_k"] and top >= 2:
            runs.append((k["name"], random.Random(i).randint(2, top)))
    return runs


@needs_gpu
def test_wgmma_kernels_random_shapes():
    """Every wgmma kernel over 240 random group-128 shapes in its output dtype (M = 1, odd M,
    outliers 0 / 64 / 128, N not a multiple of any tile, residual or not): bit for bit the
    reference at split 1 (within the summation-order tolerance at split-K > 1), outputs poisoned
    with NaN first; the dispatch path runs each case too."""
    wg = [k for k in kernels.runnable_kernels() if k["family"] == "wgmma"]
    if not wg:
        pytest.skip("no wgmma-family kernel runs on this device (sm90a only)")
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = {k["name"]: 0 for k in wg}
    covered = {"m1": 0, "odd_m": 0, **{f"o{o}": 0 for o in (0, 64, 128)}}
    failures = []
    for i, (m, n, spec, residual) in enumerate(wgmma_cases(WGMMA_SHAPES)):
        covered["m1"] += m == 1
        covered["odd_m"] += m % 2
        covered[f"o{spec.outliers}"] += 1
        for dtype, want in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
            a, w, res = make_operands(m, n, spec, dtype, residual, seed=500 + i)
            ref = formats.w4a4_matmul_reference(a, w, dtype, res)
            runs = [("", 0)] + _wgmma_runs([k for k in wg if k["out_dtype"] == want], n, spec, i)
            for name, split in runs:
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                got = kernels.w4a4_gemm(a, w, dtype, res, kernel=name, split_k=split, out=out)
                torch.cuda.synchronize()
                nbad = compare(got, ref, dtype)[2]
                if name and split == 1:
                    shapes[name] += 1
                # every wgmma kernel promotes as the reference does: exact at split 1 (split-K built too)
                if nbad or (name and split == 1 and not torch.equal(got, ref)):
                    failures.append(f"{name or 'dispatch'} split={split} M={m} N={n} {spec} {dtype} "
                                    f"residual={residual}: {nbad} out of tolerance, "
                                    f"{int((got != ref).sum())} of {got.numel()} differ")
    for name, count in sorted(shapes.items()):
        print(f"{name}: {count} shapes")
    print(f"{WGMMA_SHAPES} cases x 2 dtypes, coverage {covered}, {len(failures)} failures")
    assert not failures, "\n".join(failures[:20])
    assert covered["m1"] and covered["odd_m"] and all(covered[f"o{o}"] for o in (0, 64, 128)), covered
    # each kernel saw >= 200 shapes but the _w4 tiles (N % 128 == 0 only: about half)
    assert all(c >= (100 if kernels.uses_weight_fragments(name) else 200) for name, c in shapes.items()), shapes


def extreme_operand(rows: int, spec, rng: torch.Generator, saturate: bool) -> formats.QuantizedTensor:
    """INT4 values only -8 or 7 (all -8 if saturate), INT8 outliers -127 or 127 (all -127), random
    fp16 scales in [0.5, 2): the largest group dot products the format allows (128 * 64 = 2^13 for
    a group, 128 * 127^2 ~ 2^21 for the outlier group)."""
    kn, o = spec.k_normal, spec.outliers
    if saturate:
        q = torch.full((rows, kn), -8, dtype=torch.int8)
        qo = torch.full((rows, o), -127, dtype=torch.int8)
    else:
        q = torch.where(torch.rand(rows, kn, generator=rng) < 0.5, -8, 7).to(torch.int8)
        qo = torch.where(torch.rand(rows, o, generator=rng) < 0.5, -127, 127).to(torch.int8)
    scale = (0.5 + 1.5 * torch.rand(rows, spec.scale_columns, generator=rng)).to(torch.float16)
    return formats.QuantizedTensor(formats.pack_int4(q), qo, scale, spec)


@needs_gpu
def test_kernels_extreme_values():
    """Operands at the ends of the INT4 / INT8 ranges: the wgmma kernels' FP8 tensor-core dot of a
    128-wide group (|dot| <= 2^13, exact in its accumulator by staging.py's argument) and s8 outlier
    dot stay bit for bit the reference's; every other kernel stays in tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(3)
    failures, runs = [], 0
    for spec in (QuantSpec(4096, 128, 128), QuantSpec(576, 128, 64), QuantSpec(1536, 128, 0)):
        for m, n, saturate in ((1, 256, True), (7, 384, False), (64, 512, True), (300, 256, False), (1024, 1024, False)):
            for dtype, want in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
                a = extreme_operand(m, spec, gen, saturate).to("cuda")
                w = extreme_operand(n, spec, gen, saturate).to("cuda")
                # scale the output into the dtype's range: the all -8 rows give 2^13 x scales per group
                w.scale.mul_(2.0 ** -10)
                ref = formats.w4a4_matmul_reference(a, w, dtype, None)
                assert torch.isfinite(ref.float()).all()
                for k in kernels.runnable_kernels():
                    if k["out_dtype"] != want or spec.group % k["tile_k"] or spec.outliers % (k["tile_k"] // 2):
                        continue
                    if kernels.uses_weight_fragments(k["name"]) and n % k["tile_m"]:
                        continue
                    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                    got = kernels.w4a4_gemm(a, w, dtype, None, kernel=k["name"], out=out)
                    torch.cuda.synchronize()
                    runs += 1
                    nbad = compare(got, ref, dtype)[2]
                    exact = k["family"] == "wgmma" or must_be_exact(k["name"])
                    if nbad or (exact and not torch.equal(got, ref)):
                        failures.append(f"{k['name']} M={m} N={n} {spec} {dtype} saturate={saturate}: {nbad} "
                                        f"out of tolerance, {int((got != ref).sum())} of {got.numel()} differ")
    print(f"extreme values: {runs} runs, {len(failures)} failures")
    assert runs and not failures, "\n".join(failures[:20])


@needs_gpu
def test_wgmma_kernels_refuse_group_64():
    """A wgmma kernel forced on group 64 says why; the dispatch runs another family instead."""
    wg = [k["name"] for k in kernels.runnable_kernels() if k["family"] == "wgmma" and k["out_dtype"] == "f16"]
    if not wg:
        pytest.skip("no wgmma-family kernel runs on this device (sm90a only)")
    spec = QuantSpec(4096, 64, 128)
    a, w, _ = make_operands(300, 256, spec, torch.float16, False)
    for name in wg:
        with pytest.raises(formats.FormatError, match="group 128"):
            kernels.w4a4_gemm(a, w, torch.float16, None, kernel=name)
    got = kernels.w4a4_gemm(a, w, torch.float16, None)
    assert kernels.kernel_family(kernels.dispatched_kernel(a, w, torch.float16)[0]) != "wgmma"
    assert compare(got, formats.w4a4_matmul_reference(a, w, torch.float16), torch.float16)[2] == 0


@needs_gpu
def test_op_dispatch_and_errors():
    spec = QuantSpec(4096, 128, 128)
    a, w, res = make_operands(5, 256, spec, torch.float16, True)
    out = torch.ops.atom.w4a4_gemm(a.packed, a.outlier, a.scale, w.packed, w.outlier, w.scale, 128,
                                   torch.float16, res)
    ref = formats.w4a4_matmul_reference(a, w, torch.float16, res)
    assert compare(out, ref, torch.float16)[2] == 0
    # N not a multiple of 16: a clear error, never a silent wrong answer.
    a2, w2, _ = make_operands(3, 40, spec, torch.float16, False)
    with pytest.raises(formats.FormatError, match="N % 16"):
        kernels.w4a4_gemm(a2, w2, torch.float16, None)
    with pytest.raises(formats.FormatError, match="no compiled kernel"):
        kernels.w4a4_gemm(a, w, torch.float16, None, kernel="atom_w4a4_nope")
    # More than 128 outliers: the wgmma kernels say why; the dispatch falls back to a kernel that can.
    wg = [k["name"] for k in kernels.runnable_kernels() if k["family"] == "wgmma" and k["out_dtype"] == "f16"]
    if wg:
        spec256 = QuantSpec(4096 + 128, 128, 256)
        a3, w3, _ = make_operands(1024, 256, spec256, torch.float16, False)
        with pytest.raises(formats.FormatError, match="at most 128 outliers"):
            kernels.w4a4_gemm(a3, w3, torch.float16, None, kernel=wg[0])
        got = kernels.w4a4_gemm(a3, w3, torch.float16, None)
        assert compare(got, formats.w4a4_matmul_reference(a3, w3, torch.float16), torch.float16)[2] == 0


@needs_gpu
def test_runtime_tuning_table_drives_dispatch():
    """The committed tuning table of this GPU (tuning/tables/<gpu>.json, same OP_REVISION), if any,
    is what the op runs: for every tuned (N, K) and M bucket whose kernel is compiled, the op's
    run-time choice is the table's, and its output matches the reference."""
    from tuning.runtime import runtime_table
    from tuning.table import lookup

    name = torch.cuda.get_device_name(0)
    table = runtime_table(name, kernels.OP_REVISION)
    if table is None:
        pytest.skip(f"no tuning table for {name} (op revision {kernels.OP_REVISION})")
    major, minor = torch.cuda.get_device_capability(0)
    cc = 10 * major + minor
    arch = kernels.extension().arch_for(cc)
    compiled = set(kernels.kernel_names())
    gen = torch.Generator(device="cuda").manual_seed(0)
    checked = 0
    for shape in table["archs"][arch]["shapes"]:
        n, k = shape["n"], shape["k"]
        spec = QuantSpec(k, 128, formats.choose_outliers(k, 128, 128))
        w = formats.quantize_operand(torch.randn(n, k, device="cuda", generator=gen), spec, clip=0.85)
        for rule in shape["rules"]:
            for bucket in rule.get("buckets", []):
                m = bucket["m"]
                want = lookup(table, arch, m, n, k, "f16", generic=False)
                if want.kernel not in compiled:
                    continue
                got = kernels._tuned_choice(0, cc, m, n, k, 128, spec.outliers, 0)
                assert got == (want.kernel, want.split_k), (n, k, m, got, want)
                x = torch.randn(m, k, device="cuda", generator=gen)
                x[:, spec.k_normal:] *= 8
                a = formats.quantize_operand(x, spec, clip=0.9)
                out = kernels.w4a4_gemm(a, w, torch.float16, None)
                assert compare(out, formats.w4a4_matmul_reference(a, w, torch.float16), torch.float16)[2] == 0
                checked += 1
    assert checked, "no tuned kernel of the table is compiled in this build"


@needs_gpu
def test_opcheck_cuda():
    spec = QuantSpec(4096, 128, 128)
    a, w, res = make_operands(5, 256, spec, torch.float16, True)
    for r in (None, res):
        torch.library.opcheck(torch.ops.atom.w4a4_gemm.default,
                              (a.packed, a.outlier, a.scale, w.packed, w.outlier, w.scale, 128, torch.float16, r))


@needs_gpu
def test_torch_compile_and_cuda_graph():
    spec = QuantSpec(1536, 128, 128)
    a, w, res = make_operands(16, 512, spec, torch.bfloat16, True)
    ref = formats.w4a4_matmul_reference(a, w, torch.bfloat16, res)

    def f(a_p, a_o, a_s, res):
        return torch.ops.atom.w4a4_gemm(a_p, a_o, a_s, w.packed, w.outlier, w.scale, spec.group,
                                        torch.bfloat16, res) * 2

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(a.packed, a.outlier, a.scale, res)
    assert compare(got / 2, ref, torch.bfloat16)[2] == 0

    # CUDA graph capture of the op (decode shape: split-K path with its workspace + memset).
    static = [t.clone() for t in (a.packed, a.outlier, a.scale, res)]
    f(*static)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(*static)
    a2, _, res2 = make_operands(16, 512, spec, torch.bfloat16, True, seed=7)
    for s, t in zip(static, (a2.packed, a2.outlier, a2.scale, res2)):
        s.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    ref2 = formats.w4a4_matmul_reference(a2, w, torch.bfloat16, res2)
    assert compare(out / 2, ref2, torch.bfloat16)[2] == 0


def sanitize_main() -> int:
    """A few shapes per kernel, for `compute-sanitizer --tool memcheck python tests/test_gemm_gpu.py --sanitize`
    (ATOM_SANITIZE_FILTER=text: only the kernels whose name contains it)."""
    only = os.environ.get("ATOM_SANITIZE_FILTER", "")
    cases = [(1, 64, QuantSpec(576, 64, 0), torch.float16, True),
             (17, 96, QuantSpec(576, 128, 64), torch.bfloat16, False),
             (130, 144, QuantSpec(1536, 128, 128), torch.float16, True),
             (3, 4096 // 16, QuantSpec(4096, 128, 128), torch.bfloat16, True),
             (33, 128, QuantSpec(1600, 128, 64), torch.float16, True)]  # a 128-row tile of the _w4 kernels
    bad = 0
    for i, (m, n, spec, dtype, residual) in enumerate(cases):
        a, w, res = make_operands(m, n, spec, dtype, residual, seed=100 + i)
        ref = formats.w4a4_matmul_reference(a, w, dtype, res)
        want = "f16" if dtype == torch.float16 else "bf16"
        for k in kernels.runnable_kernels():
            if k["out_dtype"] != want or spec.group % k["tile_k"] or spec.outliers % (k["tile_k"] // 2):
                continue
            if only not in k["name"] or (kernels.uses_weight_fragments(k["name"]) and n % k["tile_m"]):
                continue
            top = 3 if k["family"] == "mma" else min(3, staging.max_split_k(spec))
            for split in ([1, top] if k["split_k"] and top > 1 else [1]):
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                kernels.w4a4_gemm(a, w, dtype, res, kernel=k["name"], split_k=split, out=out)
                torch.cuda.synchronize()
                nb = compare(out, ref, dtype)[2]
                bad += nb
                print(f"sanitize {k['name']} split={split} M={m} N={n} {spec}: {'ok' if not nb else f'{nb} BAD'}")
    print("sanitize done", "FAIL" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    from sanitize import run_if_asked
    run_if_asked(sanitize_main)
