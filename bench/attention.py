"""Decode attention: the KV4 kernel vs torch SDPA over a contiguous fp16 cache, against the copy bandwidth.

    python -m bench.attention [--layouts llama-7b llama-3-8b] [--batch 1 16 64 256]
                              [--context 512 1024 2048 4096 8192] [--no-graph] [--skip-quant] [--out bench/results]

Every row of a batch sits at the full context (one query token each), head layouts Llama-7B (32 query
heads, 32 kv heads, head_dim 128) and Llama-3-8B (32 / 8). Implementations, same values:
- "atom_kv4": atom_ops.kv4_decode_attention over KV4 pages (group 128, page size 16, shuffled page ids);
  fp16 q, so the tensor-core decode kernel unless ATOM_KV4_DECODE=simt is set (atom_ops/attention.py).
- "torch_sdpa_fp16": F.scaled_dot_product_attention over a contiguous fp16 cache [B, Hkv, L, D] holding
  the dequantized KV4 values (so the outputs agree; their largest difference is reported). For GQA two
  forms are timed and the faster is the baseline (`sdpa_variant`): "fold" views q as [B, Hkv, R, D] (the R
  query heads of a kv head become R query rows, valid for decode because every key is visible), which
  reads K and V once; "enable_gqa" is SDPA's own GQA flag. Expanded K/V (repeat_interleave) reads R times
  the bytes and is not timed.
- "atom_paged_fp16": atom_ops.paged_decode_attention over fp16 pages of the same values and block tables
  (what the engine's fp16 / fp8 modes decode with; `kv4_vs_paged16` = its time / the KV4 kernel's).
Timing: bench.common.time_cuda (CUDA events, warm-up, L2 flushed before every call, median of --iters),
CUDA-graph replays unless --no-graph (decode runs inside graphs in serving). Reported per case: time,
speedup (sdpa / kv4), achieved GB/s of K+V bytes each reads (KV4: packed nibbles + fp16 scale and zero of
every token's K and V; fp16: 2 bytes per element) and their fraction of the device-to-device copy
bandwidth measured in the same run (bytes read + written / time). Configs that do not fit in free GPU
memory are skipped (listed). Then the fused quantization bench (bench.quant_ops) runs in the same process
unless --skip-quant. Writes attention_<tag>.{json,txt,png} (and quant_ops_<tag>.*).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from atom_ops import attention as attention_ops
from atom_ops import formats
from bench.common import L2Flusher, add_run_args, command_line, default_tag, gpu_name, series_plot, time_cuda, write_results

LAYOUTS = {"llama-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}  # (q heads, kv heads, head_dim)
GROUP = 128
PAGE_SIZE = 16
COPY_BYTES = 1 << 30


def kv4_bytes(batch: int, context: int, kv_heads: int, head_dim: int, group: int = GROUP) -> int:
    """K+V bytes the KV4 kernel reads: packed nibbles plus an fp16 scale and zero per group, per token."""
    per_token_head = head_dim // 2 + 2 * 2 * (head_dim // group)
    return 2 * batch * context * kv_heads * per_token_head


def fp16_bytes(batch: int, context: int, kv_heads: int, head_dim: int) -> int:
    return 2 * batch * context * kv_heads * head_dim * 2


def needed_bytes(batch: int, context: int, kv_heads: int, head_dim: int) -> int:
    """The KV4 cache and one fp16 copy (the contiguous cache, later the fp16 pages), with a little room for
    outputs and workspace."""
    return kv4_bytes(batch, context, kv_heads, head_dim) + fp16_bytes(batch, context, kv_heads, head_dim) + (256 << 20)


def make_case(layout: str, batch: int, context: int, device, dtype=torch.float16, seed: int = 0):
    """q [B, Hq, D], KV4 pools (k, v), block tables [B, W] over shuffled pages, context_lens [B], and the
    fp16 cache k16, v16 [B, Hkv, L, D] holding the same (dequantized) values."""
    hq, hkv, d = LAYOUTS[layout]
    g = torch.Generator(device=device).manual_seed(seed)
    width = math.ceil(context / PAGE_SIZE)
    pages = batch * width + 1  # page 0 unused, as in the engine
    pools = []
    for _ in range(2):
        shape = (pages, hkv, PAGE_SIZE)  # head-major pages (atom_ops.attention's pool layout)
        packed = torch.randint(0, 256, (*shape, d // 2), generator=g, device=device, dtype=torch.uint8)
        scale = (torch.rand(*shape, d // GROUP, generator=g, device=device) * 0.2 + 0.01).half()
        zero = torch.randn(*shape, d // GROUP, generator=g, device=device).half()
        pools.append((packed, scale, zero))
    perm = torch.randperm(pages - 1, generator=g, device=device) + 1
    tables = perm.reshape(batch, width)
    lens = torch.full((batch,), context, dtype=torch.int64, device=device)
    q = torch.randn(batch, hq, d, generator=g, device=device).to(dtype)
    k16, v16 = attention_ops.kv4_gather(pools[0], pools[1], tables, dtype)
    return q, pools, tables, lens, k16[:, :, :context], v16[:, :, :context]


def fp16_pages(pool, dtype, chunk: int = 1024) -> torch.Tensor:
    """KV4 pool -> float pages [pages, page_size, kv_heads, head_dim] of the same values, a chunk of
    pages at a time (the float32 intermediate of a whole large pool would not fit)."""
    packed, scale, zero = pool  # [pages, kv_heads, page_size, ...] (head-major)
    pages, hkv, page_size = packed.shape[:3]
    out = torch.empty(pages, page_size, hkv, 2 * packed.shape[-1], dtype=dtype, device=packed.device)
    for i in range(0, pages, chunk):
        out[i:i + chunk] = formats.dequantize_kv(packed[i:i + chunk], scale[i:i + chunk], zero[i:i + chunk],
                                                 GROUP).to(dtype).transpose(1, 2)
    return out


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str) -> torch.Tensor:
    """q [B, Hq, D] over a contiguous cache k, v [B, Hkv, L, D] -> [B, Hq, D] (module doc for variants)."""
    B, hq, d = q.shape
    hkv = k.shape[1]
    if variant == "fold":
        return F.scaled_dot_product_attention(q.view(B, hkv, hq // hkv, d), k, v).reshape(B, hq, d)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=hq != hkv)[:, :, 0]


def sdpa_variants(hq: int, hkv: int) -> list[str]:
    return ["fold", "enable_gqa"] if hq != hkv else ["fold"]


def copy_bandwidth(iters: int, flush, graph: bool) -> float:
    """Device-to-device copy of a COPY_BYTES buffer: (bytes read + written) / median time, in GB/s."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), iters, flush=flush, graph=graph)["median_us"]
    return 2 * COPY_BYTES / t / 1e3


def bench_case(layout: str, batch: int, context: int, iters: int, flush, graph: bool, copy_gbps: float):
    hq, hkv, d = LAYOUTS[layout]
    q, (kp, vp), tables, lens, k16, v16 = make_case(layout, batch, context, "cuda")
    kv4 = lambda: attention_ops.kv4_decode_attention(q, kp, vp, tables, lens)  # noqa: E731
    out = kv4()
    t_kv4 = time_cuda(kv4, iters, flush=flush, graph=graph)["median_us"]
    sdpa, diff = {}, 0.0
    for variant in sdpa_variants(hq, hkv):
        try:
            ref = sdpa_decode(q, k16, v16, variant)
        except (RuntimeError, TypeError) as e:  # e.g. enable_gqa unsupported by this torch
            print(f"  sdpa {variant}: {e}", file=sys.stderr)
            continue
        diff = max(diff, float((out.float() - ref.float()).abs().max()))
        sdpa[variant] = time_cuda(lambda v=variant: sdpa_decode(q, k16, v16, v), iters, flush=flush,
                                  graph=graph)["median_us"]
    variant = min(sdpa, key=sdpa.get)
    t_sdpa = sdpa[variant]
    # the paged fp16 decode kernel (the engine's fp16 / fp8 modes) over fp16 pages of the same values
    t_paged = None
    if attention_ops.paged_kernel_available():
        del k16, v16  # room for the fp16 pages (the largest cases fill the GPU)
        torch.cuda.empty_cache()
        kf, vf = (fp16_pages(pool, q.dtype) for pool in (kp, vp))
        paged = lambda: attention_ops.paged_decode_attention(q, kf, vf, tables, lens)  # noqa: E731
        paged_diff = float((paged().float() - out.float()).abs().max())
        t_paged = time_cuda(paged, iters, flush=flush, graph=graph)["median_us"]
    b4, b16 = kv4_bytes(batch, context, hkv, d), fp16_bytes(batch, context, hkv, d)
    case = {"layout": layout, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "batch": batch, "context": context,
            "group": GROUP, "page_size": PAGE_SIZE}
    gb4, gb16 = b4 / t_kv4 / 1e3, b16 / t_sdpa / 1e3
    rows = [{"case": case, "impl": "atom_kv4", "median_us": round(t_kv4, 2), "bytes": b4, "GBps": round(gb4, 1),
             "frac_copy": round(gb4 / copy_gbps, 3), "speedup_vs_sdpa": round(t_sdpa / t_kv4, 3),
             "max_abs_diff_vs_sdpa": round(diff, 5)},
            {"case": case, "impl": "torch_sdpa_fp16", "sdpa_variant": variant, "median_us": round(t_sdpa, 2),
             "variants_us": {k: round(v, 2) for k, v in sdpa.items()}, "bytes": b16, "GBps": round(gb16, 1),
             "frac_copy": round(gb16 / copy_gbps, 3)}]
    if t_paged is not None:
        rows.append({"case": case, "impl": "atom_paged_fp16", "median_us": round(t_paged, 2), "bytes": b16,
                     "GBps": round(b16 / t_paged / 1e3, 1), "frac_copy": round(b16 / t_paged / 1e3 / copy_gbps, 3),
                     "kv4_speedup_vs_paged": round(t_paged / t_kv4, 3), "max_abs_diff_vs_kv4": round(paged_diff, 5)})
    return rows


def table_row(kv4: dict, sdpa: dict, paged: dict | None = None) -> dict:
    c = kv4["case"]
    return {"layout": c["layout"], "B": c["batch"], "L": c["context"], "kv4_us": kv4["median_us"],
            "sdpa_us": sdpa["median_us"], "sdpa_form": sdpa["sdpa_variant"], "speedup": kv4["speedup_vs_sdpa"],
            "kv4_GBps": kv4["GBps"], "kv4_frac_copy": kv4["frac_copy"], "sdpa_GBps": sdpa["GBps"],
            "sdpa_frac_copy": sdpa["frac_copy"], "max_diff": kv4["max_abs_diff_vs_sdpa"],
            "paged16_us": paged["median_us"] if paged else "-", "paged16_GBps": paged["GBps"] if paged else "-",
            "kv4_vs_paged16": paged["kv4_speedup_vs_paged"] if paged else "-"}


def plot(table: list[dict], path: Path):
    series = {}
    for r in table:
        series.setdefault((r["layout"], f"B={r['B']}"), []).append((r["L"], r["speedup"]))
    return series_plot(path, series, "speedup: torch SDPA fp16 us / KV4 kernel us",
                       f"KV4 decode attention vs fp16 SDPA on {gpu_name()}", xlabel="context (tokens)", reference=1.0)


def short_tag() -> str:
    """'h100' on an H100 (the committed results' name), else bench.common.default_tag()."""
    m = re.search(r"\b(H100|H200|A100|L40S|B200)\b", gpu_name())
    return m.group(1).lower() if m else default_tag()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--context", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--no-graph", action="store_true", help="time eager calls instead of CUDA-graph replays")
    p.add_argument("--skip-quant", action="store_true", help="do not run the fused quantization bench (bench.quant_ops)")
    add_run_args(p)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not attention_ops.kernels_available():
        print("bench.attention needs a CUDA GPU and the compiled extension (with the KV4 kernels)", file=sys.stderr)
        return 2
    tag, graph = args.tag or short_tag(), not args.no_graph
    flush = L2Flusher()
    copy_gbps = copy_bandwidth(args.iters, flush, graph)
    torch.cuda.empty_cache()  # each case's buffers go back to the device before the next fit check
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows, table, skipped = [], [], []
    for layout in args.layouts:
        _, hkv, d = LAYOUTS[layout]
        for batch in args.batch:
            for context in args.context:
                need, free = needed_bytes(batch, context, hkv, d), torch.cuda.mem_get_info()[0]
                if need > 0.9 * free:
                    skipped.append({"layout": layout, "batch": batch, "context": context,
                                    "why": f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
                    print(f"skip {layout} B={batch} L={context}: {skipped[-1]['why']}", flush=True)
                    continue
                case_rows = bench_case(layout, batch, context, args.iters, flush, graph, copy_gbps)
                torch.cuda.empty_cache()
                rows += case_rows
                table.append(table_row(*case_rows))
                t = table[-1]
                print(f"{layout} B={batch} L={context}: kv4 {t['kv4_us']} us ({t['kv4_GBps']} GB/s, "
                      f"{t['kv4_frac_copy']:.2f} of copy), sdpa[{t['sdpa_form']}] {t['sdpa_us']} us: "
                      f"{t['speedup']:.2f}x", flush=True)
    cols = ["layout", "B", "L", "kv4_us", "sdpa_us", "sdpa_form", "speedup", "kv4_GBps", "kv4_frac_copy", "sdpa_GBps",
            "sdpa_frac_copy", "max_diff", "paged16_us", "paged16_GBps", "kv4_vs_paged16"]
    names = [f"{s['layout']} B={s['batch']} L={s['context']}" for s in skipped]
    footer = f"copy bandwidth {copy_gbps:.0f} GB/s (read + write); skipped: {', '.join(names) or 'none'}"
    write_results(args.out, f"attention_{tag}", "attention", rows, table, cols, command_line("bench.attention"),
                  plot=lambda path: plot(table, path), footer=footer, copy_GBps=round(copy_gbps, 1),
                  graph=graph, skipped=skipped)
    if not args.skip_quant:
        from bench import quant_ops
        quant_ops.main(["--out", str(args.out), "--tag", tag, "--iters", str(args.iters)] + (["--graph"] if graph else []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
