"""The decode GEMM's floor: the stream kernel's weight reads alone, against cuBLAS fp16 and our op.

    python -m bench.stream_floor [--models llama-7b llama-3-8b] [--iters 50] [--out bench/results] [--tag h100]

For every linear shape of the models at M = 1: a probe kernel (compiled here with
torch.utils.cpp_extension, needs nvcc) that reads 4-bit weight bytes the way the stream kernel does
(32 rows per CTA, 2 x 4 warps, each warp a ring of 64-byte row chunks through cp.async; K / 2 bytes
per row, ~3% fewer than the kernel, whose outlier columns are 8-bit) and does nothing else, in four variants (ring depth 3 and 8; rows as stored, or 1 KB tiles per warp
chunk); a 16-byte copy (the graph replay's own floor); torch fp16 (cuBLAS) and atom's W4A4 op on
pre-quantized activations. CUDA-graph replays, L2 flushed, median of --iters. What it shows: how
far the kernel is from reading its bytes at the rate the hardware allows from a graph replay, and
the best ratio to fp16 an ideal kernel could reach. Writes stream_floor_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import L2Flusher, add_run_args, command_line, cuda_missing, default_tag, time_cuda, write_results

PROBE_CUDA = r"""
#include <cuda_runtime.h>
#include <cstdint>
template <int S, bool TILED>
__global__ void __launch_bounds__(256) stream_read(const uint8_t* w, int N, int K, unsigned* sink) {
  extern __shared__ __align__(16) uint8_t ring[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wn = warp % 2, wk = warp / 2;
  const int row0 = blockIdx.x * 32 + wn * 16, chunks = K / 128;
  const int c0 = wk * chunks / 4, n = (wk + 1) * chunks / 4 - c0;  // this warp's 64-byte chunks
  const int g = lane / 4, c = lane % 4;
  uint8_t* slot = ring + warp * S * 1024;
  auto issue = [&](int i) {
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + g + 8 * h, ch = c0 + i;
      const uint8_t* src = TILED ? w + ((static_cast<size_t>(r / 16) * chunks + ch) * 1024 + (r % 16) * 64 + 16 * c)
                                 : w + static_cast<size_t>(r) * (K / 2) + ch * 64 + 16 * c;
      const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(slot + (i % S) * 1024 + (g + 8 * h) * 64 + 16 * c));
      asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  unsigned acc = 0;
  for (int i = 0; i < S && i < n; ++i) issue(i);
  for (int i = 0; i < n; ++i) {
    asm volatile("cp.async.wait_group %0;" ::"n"(S - 1) : "memory");
    __syncwarp();
    const uint4 v = *reinterpret_cast<const uint4*>(slot + (i % S) * 1024 + g * 64 + 16 * c);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
    __syncwarp();
    if (i + S < n) issue(i + S);
    else asm volatile("cp.async.commit_group;" ::: "memory");
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the reads
}
template <int S, bool TILED> void launch(const uint8_t* w, int N, int K, unsigned* sink, cudaStream_t st) {
  cudaFuncSetAttribute(stream_read<S, TILED>, cudaFuncAttributeMaxDynamicSharedMemorySize, 8 * S * 1024);
  stream_read<S, TILED><<<N / 32, 256, 8 * S * 1024, st>>>(w, N, K, sink);
}
void run(int64_t variant, int64_t w, int64_t N, int64_t K, int64_t sink, int64_t stream) {
  auto p = reinterpret_cast<const uint8_t*>(w);
  auto s = reinterpret_cast<unsigned*>(sink);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (variant == 0) launch<3, false>(p, N, K, s, st);
  else if (variant == 1) launch<8, false>(p, N, K, s, st);
  else if (variant == 2) launch<3, true>(p, N, K, s, st);
  else launch<8, true>(p, N, K, s, st);
}
"""
VARIANTS = ("rows_s3", "rows_s8", "tiles_s3", "tiles_s8")


def probe_module():
    from torch.utils.cpp_extension import load_inline
    return load_inline("atom_stream_floor", cpp_sources="void run(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);",
                       cuda_sources=PROBE_CUDA, functions=["run"], extra_cuda_cflags=["-O3"], verbose=False)


def bench_shape(probe, model: str, layer: str, n: int, k: int, iters: int, flush) -> dict:
    from atom_ops import formats, kernels
    spec = formats.QuantSpec(k, 128, formats.choose_outliers(k, 128, 128))
    w_bytes = n * (spec.k_normal // 2 + spec.outliers)
    kp = k // 128 * 128  # the probe reads whole 64-byte chunks of 128 values
    w = torch.randint(0, 255, (n, kp // 2), dtype=torch.uint8, device="cuda")
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")
    row = {"model": model, "layer": layer, "N": n, "K": k, "weight_MB": round(w_bytes / 1e6, 2)}
    for v, name in enumerate(VARIANTS):
        row[f"{name}_us"] = round(time_cuda(lambda v=v: probe.run(v, w.data_ptr(), n, kp, sink.data_ptr(),
                                                                 torch.cuda.current_stream().cuda_stream),
                                            iters, flush=flush, graph=True)["median_us"], 2)
    tiny, tiny2 = torch.empty(8, dtype=torch.int16, device="cuda"), torch.empty(8, dtype=torch.int16, device="cuda")
    row["floor_us"] = round(time_cuda(lambda: tiny2.copy_(tiny), iters, flush=flush, graph=True)["median_us"], 2)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    wf = torch.randn(n, k, device="cuda", dtype=torch.float16)
    row["fp16_us"] = round(time_cuda(lambda: x @ wf.T, iters, flush=flush, graph=True)["median_us"], 2)
    a = formats.quantize_operand(x.float(), spec, clip=0.9)
    wq = formats.quantize_operand(wf.float(), spec, clip=0.85)
    kernels.w4a4_gemm(a, wq, torch.float16, None)
    row["atom_us"] = round(time_cuda(lambda: kernels.w4a4_gemm(a, wq, torch.float16, None), iters, flush=flush,
                                     graph=True)["median_us"], 2)
    best = min(row[f"{v}_us"] for v in VARIANTS)
    row["probe_TBps_in_kernel"] = round(n * kp / 2 / max(best - row["floor_us"], 1e-3) / 1e6, 2)
    row["atom_vs_fp16"] = round(row["fp16_us"] / row["atom_us"], 2)
    row["ideal_vs_fp16"] = round(row["fp16_us"] / best, 2)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-7b", "llama-3-8b"])
    add_run_args(p, iters=50)
    args = p.parse_args(argv)
    if cuda_missing("bench.stream_floor"):
        return 2
    from bench.gemm import model_shapes
    probe = probe_module()
    flush = L2Flusher()
    rows = []
    for model in args.models:
        for layer, (n, k) in model_shapes(model):
            rows.append(bench_shape(probe, model, layer, n, k, args.iters, flush))
            print(rows[-1], flush=True)
    cols = ["model", "layer", "N", "K", "weight_MB", *(f"{v}_us" for v in VARIANTS), "floor_us", "fp16_us", "atom_us",
            "probe_TBps_in_kernel", "atom_vs_fp16", "ideal_vs_fp16"]
    write_results(args.out, f"stream_floor_{args.tag or default_tag()}", "stream_floor", rows, rows, cols,
                  command_line("bench.stream_floor", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
