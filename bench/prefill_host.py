"""Where one packed prefill step's time goes: host (Python + launches) against GPU kernels.

    python -m bench.prefill_host [--model smollm2-135m] [--modes fp16 atom] [--prompts 8] [--input 1024]
                                 [--repeat 8] [--device cuda] [--out bench/results] [--tag h100_smollm2]

For each mode (bench.e2e's models: random weights for a preset or config.json, real ones for
"default"), an Engine runs `--repeat` steps that each prefill `--prompts` new prompts of `--input`
random tokens packed into one forward, and reports per step: the wall time (synchronized), the
host time of the forward alone (it only enqueues kernels, so when it exceeds the kernels' time the
step is host-bound), the GPU kernel time of one step (torch.profiler, CUDA activity only), the top
kernels by GPU time, and the top Python functions of one step by own time (cProfile). Used to say
why a small model's prefill (the shipped SmolLM2: hidden 576) is host-bound and where atom's extra
host and GPU time goes. Writes prefill_host_<tag>.{json,txt}.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, command_line, default_tag, print_table, write_results
from bench.e2e import build, load_config, sync


def prefill_steps(model, prompts: int, input_len: int, repeat: int, device: torch.device, seed: int) -> dict:
    from models.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(model, EngineConfig(max_batch=prompts, max_context=input_len + 16, kv_cache_bytes=2 << 30,
                                        max_prefill_tokens=prompts * input_len))
    body, host = engine.runner.body, []

    def timed_body(*args, **kwargs):  # the forward's host time: it enqueues, the GPU runs behind
        t0 = time.perf_counter()
        out = body(*args, **kwargs)
        host.append(time.perf_counter() - t0)
        return out

    engine.runner.body = timed_body
    gen = torch.Generator().manual_seed(seed)

    def one_step(around=None) -> float:
        """Queue the prompts (one token each), time the step that prefills them all, drain."""
        for _ in range(prompts):
            engine.add_request(torch.randint(0, model.config.vocab_size, (input_len,), generator=gen).tolist(),
                               SamplingParams(max_tokens=1, ignore_eos=True))
        sync(device)
        t0 = time.perf_counter()
        with around if around is not None else contextlib.nullcontext():
            engine.step()
            sync(device)
        wall = time.perf_counter() - t0
        while engine.has_work():
            engine.step()
        return wall

    for _ in range(3):  # warm-up: first calls, staged weights, allocator
        one_step()
    host.clear()
    walls = [one_step() for _ in range(repeat)]
    hosts = list(host)
    row = {"wall_ms": [round(1e3 * w, 2) for w in walls], "forward_host_ms": [round(1e3 * h, 2) for h in hosts],
           "wall_ms_median": round(1e3 * statistics.median(walls), 2),
           "forward_host_ms_median": round(1e3 * statistics.median(hosts), 2)}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CUDA])
        one_step(prof)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        row["gpu_kernels_ms"] = round(sum(e.self_device_time_total for e in events) / 1e3, 3)
        row["top_kernels"] = [{"name": e.key[:90], "ms": round(e.self_device_time_total / 1e3, 3), "calls": e.count}
                              for e in events[:10]]
    profiler = cProfile.Profile()  # a context manager that enables it
    one_step(profiler)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]  # (file, line, name) -> (cc, nc, tottime, ...)
    row["top_python"] = [{"function": f"{Path(f).name}:{line}({name})", "calls": v[1], "own_ms": round(1e3 * v[2], 2)}
                         for (f, line, name), v in top]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefill_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a preset, an HF config.json (random weights) or 'default'")
    p.add_argument("--modes", nargs="+", default=["fp16", "atom"], choices=["fp16", "fp8", "atom"])
    p.add_argument("--prompts", type=int, default=8, help="prompts packed into each prefill step")
    p.add_argument("--input", type=int, default=1024, help="tokens per prompt")
    p.add_argument("--repeat", type=int, default=8, help="timed steps per mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.prefill_host: --device cuda but no CUDA GPU", file=sys.stderr)
        return 2
    cfg = load_config(args.model, None)
    rows, table, details = [], [], []
    for mode in args.modes:
        model = build(args.model, cfg, mode, device, args.seed)
        r = prefill_steps(model, args.prompts, args.input, args.repeat, device, args.seed)
        case = {"model": args.model, "mode": mode, "prompts": args.prompts, "input": args.input}
        rows.append({"case": case, "impl": mode, **r})
        table.append({"mode": mode, "tokens": args.prompts * args.input, "wall_ms_p50": r["wall_ms_median"],
                      "wall_ms_min": min(r["wall_ms"]), "wall_ms_max": max(r["wall_ms"]),
                      "forward_host_ms_p50": r["forward_host_ms_median"], "gpu_kernels_ms": r.get("gpu_kernels_ms", "-")})
        details.append(f"\n== {mode}: top kernels by GPU time (one step) ==\n"
                       + (print_table(r["top_kernels"], ["name", "ms", "calls"], echo=False) if "top_kernels" in r else "-")
                       + f"\n== {mode}: top Python functions by own time (one step, cProfile) ==\n"
                       + print_table(r["top_python"], ["function", "calls", "own_ms"], echo=False))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_results(args.out, f"prefill_host_{args.tag or default_tag()}", "prefill_host", rows, table,
                  ["mode", "tokens", "wall_ms_p50", "wall_ms_min", "wall_ms_max", "forward_host_ms_p50", "gpu_kernels_ms"],
                  command_line("bench.prefill_host"), footer="".join(details), device=str(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
