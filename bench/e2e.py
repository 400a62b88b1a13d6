"""End-to-end serving throughput: fp16 vs fp8 vs atom modes of models/engine, side by side.

    python -m bench.e2e [--models llama-7b llama-3-8b] [--modes fp16 fp8 atom] [--batch 16 64 128 256]
                        [--input 1024] [--input-min N] [--output 256] [--kv-gib 30] [--layers N] [--cuda-graphs]
                        [--overlap on|off]
                        [--prefill-tokens 8192] [--device cuda] [--out bench/results] [--tag h100] [--profile N]
                        [--repeat N]

Each model is built from its config (models.config presets or an HF config.json) with random
weights (normal, std 0.02), once per mode: fp16 as is, fp8 through models/engine/fp8.py, atom
through models.quantize.quantize_model_uncalibrated (Atom's format, RTN with a random channel
order, KV4 pages: the same kernels and bytes as a calibrated checkpoint). For every batch size,
`batch` requests of `input` random prompt tokens and `output` generated tokens (ignore_eos) go
into one Engine at once; after a warm-up request, the wall time until all finish is measured.
`--input-min N`: prompt lengths drawn uniformly from N..input instead (a serving mix: a packed
prefill step then holds chunks of unequal shapes, whose attention runs per run of equal shapes).
Each engine step packs up to `--prefill-tokens` prompt tokens (several prompts) into one prefill
forward beside the decode step of the running sequences.
Reported per (model, mode, batch): output tokens/s over the whole run (prefill included), decode
tokens/s and per-step latency after the last prefill, time to first token of the batch, per-request
latency (each request's time to first token, time per output token after it and end-to-end time:
mean / p50 / p99 over the requests; a second table and the plot's right panel), and how
many sequences the KV cache held at once and could hold at the `--kv-gib` budget (KV4 pages
hold about 3.5x more than fp16 pages). The engine's max_batch is the smaller of `batch` and what the
budget holds at full length (the rest queue), so no mode thrashes on preemption.
`--overlap off` (with `--cuda-graphs`, where it is on by default) measures the synchronous decode step,
whose host work leaves the GPU idle; `on` also runs it without graphs (models/engine/overlap.py).
`--layers N` keeps only the first N decoder layers of the random-weight models (to fit or to save
time; stated in the JSON). `default` is the shipped SmolLM2 with its real weights, all layers.
`--profile N` also runs one packed prefill step and N decode steps at `--profile-batch` (no CUDA
graphs) under torch.profiler and prints where their GPU time goes, per kernel, into
e2e_<tag>_profile.txt: what limits each mode.
`--repeat N` runs every case N times (same engine settings and prompts) and reports the median run,
with all runs' tokens/s and their spread in the JSON.
Writes e2e_<tag>.{json,txt,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

from bench.common import (RESULTS, command_line, default_tag, draw_series, finish_m_plot, gpu_name, label_m_axes,
                          new_figure, print_table, write_results)

MODES = ("fp16", "fp8", "atom")


def load_config(name: str, layers: int | None):
    """A preset name, an HF config.json, "default" (the shipped SmolLM2 GGUF) or a .gguf file."""
    from models.config import LlamaConfig, preset
    if name == "default" or name.endswith(".gguf"):
        return None  # real weights: build() loads the file
    cfg = LlamaConfig.from_json(name) if name.endswith(".json") else preset(name)
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=min(layers, cfg.num_hidden_layers))
    return cfg


@torch.no_grad()
def random_model(cfg, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """LlamaForCausalLM with random weights, initialised on the device (no CPU copy of 7B weights)."""
    from models.llama import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=device)  # allocated once, in the serving dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.fill_(1.0)  # RMSNorm weights
    model.tie_weights()
    model.model.rotary_emb.reset_buffers(device)  # inv_freq in fp32, as the loaders leave it
    return model.eval()


def real_model(name: str, dtype: torch.dtype, device: torch.device):
    """The shipped model ("default") or a GGUF file, with its real weights."""
    from models.loading import load_model
    model, _, _ = load_model(None if name == "default" else name, dtype, device)
    model.model.rotary_emb.reset_buffers(device)
    return model.eval()


def build(name: str, cfg, mode: str, device: torch.device, seed: int):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    real = name == "default" or name.endswith(".gguf")  # all its layers: --layers is for the big shapes
    model = real_model(name, dtype, device) if real else random_model(cfg, dtype, device, seed)
    if mode == "fp8":
        if device.type != "cuda":
            raise ValueError("fp8 mode needs a CUDA GPU")
        from models.engine.fp8 import convert_to_fp8
        convert_to_fp8(model)
    elif mode == "atom":
        from models.quantize import quantize_model_uncalibrated
        from models.recipe import Recipe
        # The packed weights and fp16 scales are created as the format wants; no dtype cast after.
        quantize_model_uncalibrated(model, Recipe(), seed=seed, progress=False)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GcTime:
    """Seconds the Python garbage collector ran while installed in gc.callbacks (host pauses)."""

    def __init__(self):
        self.seconds, self.collections, self._t0 = 0.0, 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.collections += 1
            self._t0 = None


def alloc_retries(device) -> int:
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0


def run_batch(model, batch: int, input_len: int, output_len: int, kv_bytes: int, cuda_graphs: bool,
              device: torch.device, seed: int, prefill_tokens: int, overlap: bool | None = None,
              input_min: int | None = None) -> dict:
    from models.engine import Engine, EngineConfig, SamplingParams
    from models.engine.kv_cache import page_bytes, pages_for
    cfg = EngineConfig(max_context=input_len + output_len, kv_cache_bytes=kv_bytes, cuda_graphs=cuda_graphs,
                       max_prefill_tokens=prefill_tokens, overlap_decode=overlap)
    per_seq = page_bytes(model, cfg.page_size, model.model.embed_tokens.weight.dtype) * pages_for(
        cfg.max_context, cfg.page_size)
    capacity = kv_bytes // per_seq                                      # full-length sequences at this budget
    # Run at most what the cache holds at full length, as a user would set max_batch: more would be
    # admitted, then preempted and recomputed as they grow.
    fit = max(1, min(batch, capacity))
    engine = Engine(model, dataclasses.replace(cfg, max_batch=fit))
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, input_len), generator=gen).tolist()
    if input_min is not None:  # unequal prompts: a prefix of each row, length uniform in input_min..input_len
        lengths = torch.randint(input_min, input_len + 1, (batch,), generator=gen).tolist()
        prompts = [p[:n] for p, n in zip(prompts, lengths)]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    # Warm-up (kernels and their first-call autotuning, staged-weight caches, allocator): one step of
    # full-size packed prefill and a few decode steps.
    for p in prompts[:max(1, min(fit, prefill_tokens // input_len))]:
        engine.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_work():
        engine.step()
    sync(device)
    ids = [engine.add_request(p, params) for p in prompts]
    retries = alloc_retries(device)
    gc_time = GcTime()  # host pauses for the garbage collector, a suspect for slow prefill phases
    gc.callbacks.append(gc_time)
    try:
        started = time.perf_counter()
        first_token, prefill_done, produced, steps_after, gc_prefill = None, None, {}, 0, None
        first_at, done_at = {}, {}  # per request: when the host got its first / last token (s after start)
        while engine.has_work():
            outs = engine.step()
            now = time.perf_counter() - started
            for o in outs:
                if o.error:
                    raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                produced[o.request_id] = produced.get(o.request_id, 0) + len(o.new_token_ids)
                if o.new_token_ids:
                    first_at.setdefault(o.request_id, now)
                if o.finished:
                    done_at[o.request_id] = now
            if first_token is None and produced:
                sync(device)
                first_token = time.perf_counter() - started
            if prefill_done is None and len(produced) == batch:
                sync(device)
                prefill_done = time.perf_counter()
                tokens_at_prefill, gc_prefill = sum(produced.values()), gc_time.seconds
            elif prefill_done is not None:
                steps_after += 1
        sync(device)
        total = time.perf_counter() - started
    finally:
        gc.callbacks.remove(gc_time)
    tokens = sum(produced.values())
    decode_time = max(time.perf_counter() - prefill_done, 1e-9) if prefill_done else float("nan")
    return {"tokens": tokens, "total_s": total, "tokens_per_s": tokens / total,
            "decode_tokens_per_s": (tokens - tokens_at_prefill) / decode_time if prefill_done else None,
            "step_ms": 1e3 * decode_time / max(steps_after, 1), "ttft_s": first_token,
            "prefill_phase_s": prefill_done - started if prefill_done else None,
            "kv_format": engine.kv_format, "kv_fit_sequences": fit, "kv_capacity_sequences": capacity,
            "preemptions": engine.stats["preemptions"], "overlapped_steps": engine.stats["overlapped_steps"],
            # cudaMalloc failures the caching allocator recovered from by freeing its cache: each a stall
            "alloc_retries": alloc_retries(device) - retries,
            "gc_s": round(gc_time.seconds, 4), "gc_prefill_s": None if gc_prefill is None else round(gc_prefill, 4),
            "gc_collections": gc_time.collections, **request_latency(ids, produced, first_at, done_at)}


def request_latency(ids: list[str], produced: dict, first_at: dict, done_at: dict) -> dict:
    """What each request saw, all submitted at t = 0: time to its first token (TTFT, queueing and
    prefill included), time per output token after the first (TPOT: (last - first) / (tokens - 1)),
    and its end-to-end latency; mean, p50 and p99 over the requests (p99 of a batch of 16 is about
    its slowest request). Times are when the host got the tokens from engine.step(), as a server
    would stream them."""
    def stats(values: list[float], scale: float) -> dict:
        v = torch.tensor(values, dtype=torch.float64) * scale
        return {"mean": round(float(v.mean()), 4), "p50": round(float(v.quantile(0.5)), 4),
                "p99": round(float(v.quantile(0.99)), 4)}
    ids = [i for i in ids if i in first_at and i in done_at]  # a request can stop before its first token
    if not ids:
        return {}
    ttft = [first_at[i] for i in ids]
    tpot = [(done_at[i] - first_at[i]) / (produced[i] - 1) for i in ids if produced[i] > 1]
    out = {"request_ttft_s": stats(ttft, 1.0), "request_latency_s": stats([done_at[i] for i in ids], 1.0)}
    if tpot:
        out["request_tpot_ms"] = stats(tpot, 1e3)
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median output tokens/s (the lower middle one for an even count), with every
    run's tokens/s and their spread (max / min - 1) added: one e2e figure moves by ~5% between runs
    on the H100 (~15% with unequal prompts), so a table of single runs over-reads its second digit."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    rates = [r["tokens_per_s"] for r in runs]
    return {**ordered[(len(ordered) - 1) // 2], "repeats": len(runs), "tokens_per_s_runs": [round(x, 1) for x in rates],
            "spread": round(max(rates) / min(rates) - 1, 4)}


def profile_steps(model, mode: str, batch: int, input_len: int, kv_bytes: int, steps: int, seed: int,
                  prefill_tokens: int) -> str:
    """Per-kernel time (torch.profiler's table, top 20 by device time) of the first engine step (one
    packed prefill of up to `prefill_tokens` tokens) and of `steps` decode steps of `batch` sequences
    of `input_len` random tokens, without CUDA graphs so that the profiler sees every kernel."""
    from models.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(model, EngineConfig(max_batch=batch, max_context=input_len + 64, kv_cache_bytes=kv_bytes,
                                        cuda_graphs=False, max_prefill_tokens=prefill_tokens))
    gen = torch.Generator().manual_seed(seed)
    # First calls, and a prefill long enough (> 512 tokens) for the sm90a wgmma kernels: their weights
    # are staged once, at first use, which must not land in the profiled prefill step.
    engine.generate([[1] * min(600, input_len)], SamplingParams(max_tokens=2, ignore_eos=True))
    for _ in range(batch):
        engine.add_request(torch.randint(0, model.config.vocab_size, (input_len,), generator=gen).tolist(),
                           SamplingParams(max_tokens=64, ignore_eos=True))
    tables = [f"== {mode}: first prefill step (up to {prefill_tokens} tokens of {input_len}-token prompts) ==\n"
              + _profile(engine, 1)]
    produced = set()
    while len(produced) < batch:  # until every sequence has its first token: prefill is over
        produced.update(o.request_id for o in engine.step())
    engine.step()
    tables.append(f"== {mode}: {steps} decode steps, batch {batch}, context ~{input_len} ==\n" + _profile(engine, steps))
    return "".join(tables)


def _profile(engine, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=20,
                                     max_name_column_width=70) + "\n"


def summary(rows: list[dict], modes) -> tuple[list[dict], list[str]]:
    """The printed table of a run's rows: one line per (model, batch), each mode's tokens/s, decode
    step and sequences held, and atom's ratios to fp16 and fp8 (also for re-rendering a saved JSON)."""
    table = {}
    for r in rows:
        c, mode = r["case"], r["impl"]
        prompt = f"{c['input_min']}-{c['input']}" if c.get("input_min") is not None else c["input"]
        trow = table.setdefault((c["model"], c["batch"]), {"model": c["model"], "batch": c["batch"], "input": prompt,
                                                          "output": c["output"]})
        trow[f"{mode}_tok_s"] = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "err"
        trow[f"{mode}_step_ms"] = f"{r['step_ms']:.1f}" if "step_ms" in r else "-"
        trow[f"{mode}_fit"] = r.get("kv_fit_sequences", "-")
    for trow in table.values():
        for base in ("fp16", "fp8"):
            a, b = trow.get("atom_tok_s"), trow.get(f"{base}_tok_s")
            ok = a not in (None, "err") and b not in (None, "err")
            trow[f"atom_vs_{base}"] = f"{float(a) / float(b):.2f}x" if ok else "-"
    cols = ["model", "batch", "input", "output"] + [f"{m}_{c}" for m in modes for c in ("tok_s", "step_ms", "fit")]
    return list(table.values()), cols + ["atom_vs_fp16", "atom_vs_fp8"]


LATENCY_COLUMNS = ["model", "batch", "mode", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms",
                   "latency_p50_s", "latency_p99_s"]


def latency_summary(rows: list[dict]) -> list[dict]:
    """Per-request latency of every (model, batch, mode) row that has it (request_latency)."""
    out = []
    for r in rows:
        if "request_ttft_s" not in r:
            continue
        c, tpot = r["case"], r.get("request_tpot_ms", {})
        out.append({"model": c["model"], "batch": c["batch"], "mode": r["impl"],
                    "ttft_p50_s": f"{r['request_ttft_s']['p50']:.3f}", "ttft_p99_s": f"{r['request_ttft_s']['p99']:.3f}",
                    "tpot_p50_ms": f"{tpot['p50']:.2f}" if tpot else "-", "tpot_p99_ms": f"{tpot['p99']:.2f}" if tpot else "-",
                    "latency_p50_s": f"{r['request_latency_s']['p50']:.2f}",
                    "latency_p99_s": f"{r['request_latency_s']['p99']:.2f}"})
    return out


def plot(rows, path: Path, gpu: str | None = None):
    """Output tokens/s (left) and the median request's time per output token (right) against batch."""
    figure = new_figure((13, 5))
    if figure is None:
        return None
    fig, _ = figure
    fig.clf()
    left, right = fig.subplots(1, 2)
    throughput, tpot = {}, {}
    for r in rows:
        key, batch = (r["impl"], r["case"]["model"]), r["case"]["batch"]
        if "tokens_per_s" in r:
            throughput.setdefault(key, []).append((batch, r["tokens_per_s"]))
        if "request_tpot_ms" in r:
            tpot.setdefault(key, []).append((batch, r["request_tpot_ms"]["p50"]))
    draw_series(left, throughput)
    draw_series(right, tpot)
    label_m_axes(right, "time per output token, median request (ms)", "Per-token latency",
                 xlabel="batch (concurrent requests)")
    return finish_m_plot(fig, left, path, "output tokens/s", f"Serving throughput on {gpu or gpu_name()}",
                         xlabel="batch (concurrent requests)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-7b", "llama-3-8b"],
                   help="presets, HF config.json paths (random weights), 'default' (the shipped SmolLM2) or a .gguf")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", nargs="+", type=int, default=[16, 64, 128, 256])
    p.add_argument("--input", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--input-min", type=int, default=None,
                   help="unequal prompts: lengths uniform in input-min..input (default: all --input)")
    p.add_argument("--output", type=int, default=256, help="generated tokens per request")
    p.add_argument("--kv-gib", type=float, default=30.0, help="KV cache budget per engine (GiB)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--cuda-graphs", action="store_true", help="capture decode steps (GPU)")
    p.add_argument("--overlap", choices=("on", "off"), default=None,
                   help="greedy decode steps one step late (models/engine/overlap.py); default: with --cuda-graphs")
    p.add_argument("--prefill-tokens", type=int, default=8192, help="prompt tokens per engine step (packed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N decode steps per model and mode (batch --profile-batch)")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run every case N times and report the median run (tokens/s of all runs and their spread)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat} must be >= 1")
    if args.input_min is not None and not 1 <= args.input_min <= args.input:
        p.error(f"--input-min {args.input_min} must be in 1..--input ({args.input})")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.e2e: --device cuda but no CUDA GPU", file=sys.stderr)
        return 2
    rows, profiles = [], []
    for name in args.models:
        cfg = load_config(name, args.layers)
        for mode in args.modes:
            try:
                model = build(name, cfg, mode, device, args.seed)
            except (ValueError, RuntimeError, OSError) as e:  # OSError: a missing model file
                print(f"{name} {mode}: skipped ({e})", file=sys.stderr)
                continue
            for batch in args.batch:
                case = {"model": name, "layers": model.config.num_hidden_layers, "batch": batch, "input": args.input,
                        "input_min": args.input_min,
                        "output": args.output, "kv_gib": args.kv_gib, "cuda_graphs": args.cuda_graphs,
                        "prefill_tokens": args.prefill_tokens, "overlap": args.overlap}
                try:
                    r = median_run([run_batch(model, batch, args.input, args.output, int(args.kv_gib * 2**30),
                                              args.cuda_graphs, device, args.seed, args.prefill_tokens,
                                              None if args.overlap is None else args.overlap == "on", args.input_min)
                                    for _ in range(args.repeat)])
                except (ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    r = {"error": str(e).splitlines()[0][:200]}
                rows.append({"case": case, "impl": mode, **r})
                print(f"{name} {mode} batch={batch}: " + (f"{r['tokens_per_s']:.1f} tok/s, step {r['step_ms']:.1f} ms, "
                      f"request TTFT p50 {r.get('request_ttft_s', {}).get('p50', float('nan')):.2f} s, "
                      f"TPOT p50 {r.get('request_tpot_ms', {}).get('p50', float('nan')):.2f} ms, "
                      f"{r['kv_format']} KV holds {r['kv_fit_sequences']}"
                      + (f" (median of {r['repeats']}, spread {100 * r['spread']:.1f}%)" if r["repeats"] > 1 else "")
                      if "tokens_per_s" in r else r["error"]), flush=True)
            if args.profile:
                profiles.append(f"{name} " + profile_steps(model, mode, args.profile_batch, args.input,
                                                           int(args.kv_gib * 2**30), args.profile, args.seed,
                                                           args.prefill_tokens))
                print(profiles[-1], flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table, cols = summary(rows, args.modes)
    latency = latency_summary(rows)
    footer = ("\nPer-request latency (all requests submitted at once; TTFT includes queueing):\n"
              + print_table(latency, LATENCY_COLUMNS, echo=False)) if latency else ""
    write_results(args.out, f"e2e_{args.tag or default_tag()}", "e2e", rows, table, cols,
                  command_line("bench.e2e"), plot=lambda path: plot(rows, path), footer=footer, device=str(device))
    if profiles:
        (args.out / f"e2e_{args.tag or default_tag()}_profile.txt").write_text("".join(profiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
