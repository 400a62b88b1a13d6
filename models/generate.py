"""Text generation: greedy, temperature and top-p sampling, stop on EOS."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """One token id from the last position's logits [vocab]."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, add_bos: bool = False) -> tuple[str, int]:
    """-> (generated text, number of new tokens). Recomputes the whole sequence each step:
    this small runtime has no KV cache yet, which is fine for short outputs of small models."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + new], device=device))[0, -1].cpu()
        tok = sample_next(logits, temperature, top_p, gen)
        if tokenizer.eos_id is not None and tok == tokenizer.eos_id:
            break
        new.append(tok)
    return tokenizer.decode(new), len(new)
