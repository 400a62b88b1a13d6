"""One GEMM shape, a few calls of each implementation, for Nsight Compute to profile.

    ncu --kernel-name regex:'atom_w4a4|cutlass|gemm|sm90' --launch-skip 2 --launch-count 3 \
        --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
        python -m bench.ncu_gemm --m 8192 --n 4096 --k 4096 [--impls atom_kernel fp8 int8]

Each implementation runs `--calls` times (the first ones are warm-up for ncu's --launch-skip):
`atom` = the op's dispatch on packed operands (at M <= 16 the stream kernel; the H100 tuning
table's choice), `atom_kernel` = the dispatched wgmma kernel on staged operands, `fp8` = torch._scaled_mm
(per-tensor scales), `int8` = the plain CUTLASS INT8 GEMM of the int8 family (the ceiling the
Hopper issue measures against). It prints nothing but the kernel names, so ncu's report is the
output. Used to say what limits the wgmma family (docs and issue notes quote its numbers).
"""

from __future__ import annotations

import argparse

import torch

from atom_ops import formats, kernels, staging


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ncu_gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--kernel", default="", help="force a wgmma kernel by name (default: dispatch)")
    p.add_argument("--impls", nargs="+", default=["atom_kernel", "fp8", "int8"],
                   choices=["atom", "atom_kernel", "fp8", "int8"])
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not kernels.available():
        p.error("needs a CUDA GPU and the compiled extension")
    torch.manual_seed(0)
    m, n, k = args.m, args.n, args.k
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    for impl in args.impls:
        if impl in ("atom", "atom_kernel"):
            spec = formats.QuantSpec(k, args.group, formats.choose_outliers(k, args.group, 128))
            a = formats.quantize_operand(x.float(), spec, clip=0.9)
            wq = formats.quantize_operand(w.float(), spec, clip=0.85)
        if impl == "atom":  # the op's dispatch on packed operands (the stream kernel at M <= 16)
            name = args.kernel or kernels.dispatched_kernel(a, wq, torch.float16)[0]
            fn = lambda: kernels.w4a4_gemm(a, wq, torch.float16, None, kernel=name, out=y)  # noqa: E731
        elif impl == "atom_kernel":
            sa, sw = staging.stage_operand(a), kernels.staged_weight(wq)
            name = kernels.extension().plan(args.kernel, m, n, k, args.group, spec.outliers, 0, 0, 0)[0]
            fn = lambda: kernels.staged_gemm(sa, sw, torch.float16, None, name, y)  # noqa: E731
        elif impl == "fp8":
            xf, wf = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            one = torch.ones((), device="cuda")
            name = "torch._scaled_mm"
            fn = lambda: torch._scaled_mm(xf, wf.t(), one, one, out_dtype=torch.float16)  # noqa: E731
        else:
            xi = torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8)
            wi = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
            name = kernels.int8_kernel_for(m, n, k)
            fn = lambda: kernels.int8_gemm(xi, wi, kernel=name)  # noqa: E731
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        print(f"{impl}: {name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
