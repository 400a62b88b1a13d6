"""Host cost per call of the ops a prefill step launches, against torch.mm's.

    python -m bench.host_overhead [--k 4096] [--n 4096] [--iters 400] [--device cuda] [--out bench/results] [--tag h100]

An eager step whose kernels are shorter than the host's work to launch them leaves the GPU waiting
(a Llama-7B 8-layer atom prefill step: ~30 ms of host launches for ~37 ms of kernels, README). Each
case runs --iters calls at M = 1 without a sync in between, so the loop is bound by the host: host
us per call = the loop's wall time / calls (wall us adds the final sync). Cases: torch.mm (fp16,
the baseline every ratio divides by), the op-registration layer alone (one trivial body with
quantized_linear's twelve arguments, called directly, through torch.library.custom_op and through
atom_ops.registration.atom_op, which the atom ops use), atom_ops.quantized_linear (the op, RMSNorm prologue) and the
pieces of its GPU launch path (kernels.quantized_linear without the op and the checks, the
quantization kernel alone writing the staged operand, the plan lookup, torch's device guard and
stream lookup against the extension's cheaper kernels.on_device / raw_stream), kv4_gather of one
row, and SDPA; on CUDA also the GPU time of SDPA's backends at a prefill shape ([8, 32, 1024, 128]
causal). --device cpu runs the reference paths (a smoke test, not a measurement).
Writes host_overhead_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import add_run_args, command_line, default_tag, write_results


def host_per_call(fn, iters: int, sync) -> tuple[float, float]:
    """(host us, wall us) per call of fn over a loop of `iters` calls with no sync inside."""
    for _ in range(min(iters, 20)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = time.perf_counter() - t0
    sync()
    return 1e6 * host / iters, 1e6 * (time.perf_counter() - t0) / iters


def device_guard(dev: torch.device, guard) -> None:
    with guard(dev):
        pass


def _layer_probe(x: torch.Tensor, perm: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                 prologue: int, clip: float, w_packed: torch.Tensor, w_outlier: torch.Tensor, w_scale: torch.Tensor,
                 group: int, out_dtype: torch.dtype, residual: torch.Tensor | None) -> torch.Tensor:
    """The registration-layer probe: quantized_linear's signature, no work but the output's allocation."""
    return x.new_empty((x.shape[0], w_packed.shape[0]), dtype=out_dtype)


def layer_ops() -> tuple:
    """The probe registered both ways (once per process): (custom_op, atom_op)."""
    from atom_ops.registration import atom_op

    if not hasattr(torch.ops.atom, "host_overhead_probe"):
        torch.library.custom_op("atom_bench::host_overhead_probe", mutates_args=())(_layer_probe)
        atom_op("host_overhead_probe")(_layer_probe)
    return torch.ops.atom_bench.host_overhead_probe.default, torch.ops.atom.host_overhead_probe.default


def host_cases(k: int, n: int, dev: torch.device) -> dict:
    """name -> zero-argument call, M = 1 (the CUDA-only launch-path pieces only on CUDA)."""
    from atom_ops import kernels, quantized_linear
    from atom_ops.attention import kv4_gather
    from atom_ops.formats import QuantSpec, quantize_operand

    spec = QuantSpec(k=k, group=128, outliers=128)
    w = quantize_operand(torch.randn(n, k, device=dev, dtype=torch.float16), spec)
    perm = torch.randperm(k, device=dev).to(torch.int32)
    norm = torch.ones(k, device=dev, dtype=torch.float16)
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    b = torch.randn(k, n, device=dev, dtype=torch.float16)
    # one KV4 layer pool (packed, scale, zero) of 8 pages x 32 heads x 16 tokens x head_dim 128, group 128
    pool = (torch.zeros(8, 32, 16, 64, dtype=torch.uint8, device=dev),
            torch.ones(8, 32, 16, 1, dtype=torch.float16, device=dev),
            torch.zeros(8, 32, 16, 1, dtype=torch.float16, device=dev))
    tables = torch.arange(8, device=dev)[None]
    q = torch.randn(1, 32, 16, 128, device=dev, dtype=torch.float16)
    via_custom_op, via_atom_op = layer_ops()
    probe_args = (x, perm, norm, 1e-5, 1, 1.0, w.packed, w.outlier, w.scale, 128, torch.float16, None)
    cases = {
        "torch.mm": lambda: torch.mm(x, b),
        "op layer: none (direct call)": lambda: _layer_probe(*probe_args),
        "op layer: torch.library.custom_op": lambda: via_custom_op(*probe_args),
        "op layer: atom_op": lambda: via_atom_op(*probe_args),
        "atom_ops.quantized_linear": lambda: quantized_linear(x, w, perm, 1.0, "rmsnorm", norm),
        "kv4_gather": lambda: kv4_gather(pool, pool, tables, torch.float16),
        "sdpa": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
    }
    if dev.type == "cuda" and kernels.available():
        cases.update({
            "kernels.quantized_linear": lambda: kernels.quantized_linear(x, w, perm, 1.0, "rmsnorm", norm, 1e-5,
                                                                         torch.float16, None),
            "kernels.quantize_rows": lambda: kernels.quantize_rows(x, spec, perm, 1.0, "rmsnorm", norm, 1e-5,
                                                                   staged=True, packed=False),
            "kernels._plan": lambda: kernels._plan("", 0, 1, n, spec, 0, dev, kernels._device_cc(dev.index or 0)),
            "torch.cuda.device guard": lambda: device_guard(dev, torch.cuda.device),
            "kernels.on_device": lambda: device_guard(dev, kernels.on_device),
            "torch.cuda.current_stream": lambda: torch.cuda.current_stream(dev).cuda_stream,
            "kernels.raw_stream": lambda: kernels.raw_stream(dev),
        })
    return cases


def sdpa_backend_us(dev: torch.device, iters: int) -> dict[str, float]:
    """GPU us per call of each SDPA backend at [8, 32, 1024, 128] causal fp16 (CUDA events)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(8, 32, 1024, 128, device=dev, dtype=torch.float16)
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
                torch.cuda.synchronize(dev)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    F.scaled_dot_product_attention(q, q, q, is_causal=True)
                end.record()
                torch.cuda.synchronize(dev)
                out[name] = 1e3 * start.elapsed_time(end) / iters
        except RuntimeError:  # the backend does not run here
            continue
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=4096, help="the linear's input features (multiple of 128)")
    p.add_argument("--n", type=int, default=4096, help="the linear's output features")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_run_args(p, iters=400)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    rows = []
    with torch.no_grad():
        for name, fn in host_cases(args.k, args.n, dev).items():
            host, wall = host_per_call(fn, args.iters, sync)
            rows.append({"case": name, "host_us": host, "wall_us": wall})
        base = rows[0]["host_us"]
        for r in rows:
            r["vs_torch_mm"] = r["host_us"] / base
        if dev.type == "cuda":
            rows += [{"case": f"sdpa {name} [8, 32, 1024, 128] causal", "gpu_us": us}
                     for name, us in sdpa_backend_us(dev, min(args.iters, 50)).items()]
    table = [{"case": r["case"], "host us": f"{r['host_us']:.1f}" if "host_us" in r else "",
              "wall us": f"{r['wall_us']:.1f}" if "wall_us" in r else "",
              "host vs torch.mm": f"{r['vs_torch_mm']:.1f}x" if "vs_torch_mm" in r else "",
              "GPU us": f"{r['gpu_us']:.1f}" if "gpu_us" in r else ""} for r in rows]
    write_results(args.out, f"host_overhead_{args.tag or default_tag()}", "host_overhead", rows, table,
                  ["case", "host us", "wall us", "host vs torch.mm", "GPU us"],
                  command_line("bench.host_overhead", argv), device=str(dev), k=args.k, n=args.n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
