"""Per-request sampling settings, and picking each sequence's next token from a batch of logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..generate import sample_next


class RequestError(ValueError):
    """A request the engine cannot serve (bad settings, prompt too long); other requests go on."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None           # per request: same seed, same prompt -> same tokens
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator for a seeded sampled request; None for greedy or unseeded (global RNG)."""
    if params.temperature <= 0 or params.seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(params.seed)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, vocab] (any device) -> one token id per row, each row with its own settings."""
    greedy = logits.argmax(dim=-1).tolist()  # one transfer for the common all-greedy case
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:
        return greedy
    rows = logits[sampled_rows].float().cpu()
    for row, i in zip(rows, sampled_rows):
        greedy[i] = sample_next(row, params[i].temperature, params[i].top_p, generators[i])
    return greedy
