"""Token sampling on hand-made logits: top-p keeps exactly the nucleus, temperature reshapes the
distribution as softmax(logits / T), temperature 0 is argmax, and sample_batch mixes greedy and
seeded sampled rows. Seeded generators make every draw deterministic; the frequency checks allow
4 standard errors, far below the gaps a broken top-p or temperature would open."""

from __future__ import annotations

import pytest
import torch

from models.engine.sampling import SamplingParams, make_generator, sample_batch
from models.generate import sample_next

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()  # softmax(LOGITS) == PROBS
DRAWS = 4000


def draw(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, n: int = DRAWS,
         seed: int = 0) -> torch.Tensor:
    """n tokens from sample_next with one seeded generator -> their frequencies [vocab]."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([sample_next(logits, temperature, top_p, gen) for _ in range(n)])
    return torch.bincount(tokens, minlength=logits.numel()).float() / n


def assert_frequencies_match(freq: torch.Tensor, expected: torch.Tensor, n: int = DRAWS):
    """Within 4 standard errors per token; a token of probability 0 must never be drawn."""
    tolerance = 4 * (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= tolerance), f"frequencies {freq.tolist()} vs {expected.tolist()}"


@pytest.mark.parametrize("top_p, nucleus", [(0.01, [0]), (0.6, [0, 1]), (0.7, [0, 1]), (0.79, [0, 1]),
                                            (0.85, [0, 1, 2]), (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_samples_only_the_nucleus_renormalized(top_p, nucleus):
    freq = draw(LOGITS, top_p=top_p)
    assert set(freq.nonzero().flatten().tolist()) == set(nucleus)
    expected = torch.zeros_like(PROBS)
    expected[nucleus] = PROBS[nucleus] / PROBS[nucleus].sum()
    assert_frequencies_match(freq, expected)


def test_top_p_includes_the_token_that_crosses_the_threshold():
    """sample_next keeps a token while the mass *before* it is < top_p, so the token that carries
    the cumulative mass past top_p is kept: at 0.51, token 0 (0.5) alone falls short and token 1
    (0.5 -> 0.8) is in. Keeping only tokens whose cumulative mass is <= top_p would drop it."""
    freq = draw(LOGITS, top_p=0.51)
    assert freq[1] > 0.3 and freq[2:].sum() == 0  # token 1 renormalized: 0.3 / 0.8 = 0.375


@pytest.mark.parametrize("temperature", [1.0, 0.25, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0])
    freq = draw(logits, temperature=temperature)
    assert_frequencies_match(freq, torch.softmax(logits / temperature, dim=-1))


def test_low_temperature_concentrates_on_the_top_token():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0])
    at_one, at_quarter = draw(logits, temperature=1.0), draw(logits, temperature=0.25)
    assert at_one[0] < 0.62 and at_quarter[0] > 0.95  # softmax: 0.58 at T=1, 0.98 at T=0.25


def test_top_p_applies_to_the_temperature_scaled_distribution():
    """At T=0.25 the probabilities become ~[0.88, 0.11, 0.007, 0]: top_p=0.85 then keeps token 0
    alone, where the unscaled probabilities would keep {0, 1, 2}."""
    freq = draw(LOGITS, temperature=0.25, top_p=0.85)
    assert freq.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_temperature_zero_is_argmax_whatever_top_p():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000, generator=gen)
        for top_p in (1.0, 0.5, 0.01):
            assert sample_next(logits, 0.0, top_p) == int(logits.argmax())


def test_sample_batch_mixes_greedy_and_seeded_sampled_rows():
    params = [SamplingParams(temperature=0.0, seed=5),            # greedy: the seed is unused
              SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.0, top_p=0.5),
              SamplingParams(temperature=0.8, top_p=0.9, seed=2)]
    assert make_generator(params[0]) is None and make_generator(params[2]) is None
    # flat logits over 64 tokens: sampling rarely picks the argmax, so sampled rows visibly differ
    steps = torch.randn(30, len(params), 64, generator=torch.Generator().manual_seed(3)) * 0.5

    def run() -> list[list[int]]:
        generators = [make_generator(p) for p in params]
        return [sample_batch(logits, params, generators) for logits in steps]

    first, second = run(), run()
    assert first == second  # same seeds, same tokens
    argmax = steps.argmax(dim=-1).tolist()
    for step, tokens in enumerate(first):
        assert tokens[0] == argmax[step][0] and tokens[2] == argmax[step][2]
    sampled = [[tokens[i] for tokens in first] for i in (1, 3)]
    assert sampled[0] != [a[1] for a in argmax] and sampled[1] != [a[3] for a in argmax]
    # each sampled row draws from its own generator, as sample_next alone would with that seed
    for i, row in zip((1, 3), sampled):
        gen = make_generator(params[i])
        assert row == [sample_next(steps[s, i], params[i].temperature, params[i].top_p, gen) for s in range(len(steps))]
