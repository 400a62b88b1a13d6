"""Perplexity over fixed windows and zero-shot multiple-choice accuracy."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import ZEROSHOT_DIR, data_dir


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 1, progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping windows [n, seqlen] (GPTQ/Atom protocol:
    every window is scored independently, its first token has no prediction)."""
    device = next(model.parameters()).device

    def score(ids: torch.Tensor) -> tuple[float, int]:
        ids = ids.to(device)
        return next_token_nll(model(ids), ids)

    return perplexity_of(score, windows, batch, "perplexity", progress)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed NLL of ids[..., 1:] under logits[..., :-1, :] in float32, how many tokens): each
    position predicts the next one."""
    logits = logits[..., :-1, :].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[..., 1:].reshape(-1), reduction="sum")
    return float(loss), ids[..., 1:].numel()


def perplexity_of(score, windows: torch.Tensor, batch: int = 1, desc: str = "perplexity",
                  progress: bool = True) -> float:
    """exp(total NLL / total tokens) over windows [n, seqlen] scored `batch` at a time by
    score(windows[i:i + batch]) -> (summed NLL, tokens)."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch), desc=desc, disable=not progress):
        n, c = score(windows[i: i + batch])
        nll, count = nll + n, count + c
    return math.exp(nll / count)


# ------------------------------------------------------------------------ zero-shot

def _split_choices(instruction: str, label: str) -> tuple[str, list[str]]:
    """(question, choices) from an instruction in the LLM-Adapters templates (data README)."""
    head, _, rest = instruction.partition("\n\n")
    question = head.split(": ", 1)[1] if ": " in head else head
    rest = re.split(r"\s*Answer format:", rest)[0]
    if label == "Solution":
        parts = re.split(r"(?:^|\n\n)Solution\d: ", rest)
    else:
        parts = re.split(rf" ?{label}\d: ", rest)
    return question.strip(), [p.strip() for p in parts if p.strip()]


def _task_items(name: str, records: list[dict]):
    """(context, [continuations], gold index) per record, lm-eval style prompts."""
    for r in records:
        ins, ans = r["instruction"], r["answer"].strip()
        if name == "boolq":
            q = ins.split("question: ", 1)[1].split("?\n\nAnswer format")[0]
            yield f"Question: {q}?\nAnswer:", [" no", " yes"], int(ans == "true")
            continue
        if name == "winogrande":
            head = ins.split("sentence: ", 1)[1]
            sentence, _, opts = head.partition("\n\nOption1: ")
            o1, _, o2 = opts.partition(" Option2: ")
            o2 = o2.split(" Answer format")[0]
            pre, _, post = sentence.partition("_")
            # score the part after the blank given each option substituted in
            yield [pre + o1.strip(), pre + o2.strip()], [" " + post.strip()] * 2, int(ans[-1]) - 1
            continue
        label = {"piqa": "Solution", "hellaswag": "Ending"}.get(name, "Answer")
        question, choices = _split_choices(ins, label)
        gold = int(re.sub(r"\D", "", ans)) - 1
        ctx = question if name == "hellaswag" else f"Question: {question}\nAnswer:"
        yield ctx, [" " + c for c in choices], gold


@torch.no_grad()
def _loglik(model, tokenizer, context: str, continuation: str, device) -> tuple[float, int]:
    ctx_ids = tokenizer.encode(context)
    full = tokenizer.encode(context + continuation)
    n_cont = max(len(full) - len(ctx_ids), 1)
    ids = torch.tensor([full], device=device)
    logp = F.log_softmax(model(ids)[0, :-1].float(), dim=-1)
    tgt = ids[0, 1:]
    lp = logp[-n_cont:].gather(-1, tgt[-n_cont:, None]).sum()
    return float(lp), len(continuation.encode("utf-8"))


def zero_shot(model, tokenizer, task: str, limit: int | None = None, data: str | Path | None = None,
              progress: bool = True) -> dict:
    """Accuracy (acc: summed log-likelihood; acc_norm: per byte) on one task file."""
    path = data_dir(data) / ZEROSHOT_DIR / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot task file not found: {path}")
    records = json.loads(path.read_text(encoding="utf-8"))[: limit or None]
    device = next(model.parameters()).device
    hits = hits_norm = n = 0
    for ctx, conts, gold in tqdm(list(_task_items(task, records)), desc=f"zero-shot {task}", disable=not progress):
        ctxs = ctx if isinstance(ctx, list) else [ctx] * len(conts)
        scores = [_loglik(model, tokenizer, c, x, device) for c, x in zip(ctxs, conts)]
        ll = [s for s, _ in scores]
        norm = [s / max(b, 1) for s, b in scores]
        hits += int(max(range(len(ll)), key=ll.__getitem__) == gold)
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
        n += 1
    return {"task": task, "n": n, "acc": hits / max(n, 1), "acc_norm": hits_norm / max(n, 1)}


ZERO_SHOT_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
