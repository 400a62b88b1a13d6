"""Continuous batching: which sequences run this step, and who owns the KV pages.

Policy (vLLM's, simplified):
- Waiting requests are admitted first-come first-served between steps, while the batch has
  room and the free pages cover the request's uncached tokens plus one decode token.
- Every step decodes one token for each running sequence with exactly one uncached token,
  then prefills the others in chunks of at most `max_prefill_tokens` tokens per step.
- Pages are allocated as tokens arrive. When the pool runs dry, the youngest running sequence
  that is not already in this step is preempted: its pages are freed and it goes back to the
  front of the queue, keeping its generated tokens, to be recomputed when pages free up. The
  oldest sequence can always grow (the pool holds one full-context sequence), so the batch
  always makes progress and running out of pages never fails a request.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from .kv_cache import PageAllocator, pages_for
from .sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int                      # params.max_tokens capped by the context length
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # grows in place; released or shrunk: a new list
    num_cached: int = 0                  # tokens whose K/V are in the pages
    preemptions: int = 0
    stop_ids: frozenset[int] = frozenset()  # stop tokens and EOS (unless ignore_eos), set once by the engine
    finished: bool = False               # finished or aborted: no more tokens (a pending step's row is discarded)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        """tokens[i] without building the concatenated list (the decode step's host path)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncached(self) -> int:
        return self.num_tokens - self.num_cached


@dataclass
class StepPlan:
    decodes: list[Sequence]                   # one new token each
    prefills: list[tuple[Sequence, int]]      # (sequence, tokens to process this step)
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_batch: int, max_prefill_tokens: int):
        self.allocator, self.page_size = allocator, page_size
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # admission order: oldest first

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in itertools.chain(self.running, self.waiting) if s.request_id == request_id), None)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> StepPlan:
        self._admit()
        plan = StepPlan([], [], [])
        in_step: set[int] = set()
        decoding, prefilling = [], []
        for seq in self.running:
            uncached = seq.num_uncached
            if uncached == 1:
                decoding.append(seq)
            elif uncached > 1:
                prefilling.append(seq)
        # a sequence leaves `running` during scheduling only by preemption (then it is in plan.preempted)
        for seq in decoding:
            if seq not in plan.preempted and self._grow(seq, 1, in_step, plan):
                plan.decodes.append(seq)
                in_step.add(id(seq))
        budget = self.max_prefill_tokens
        for seq in prefilling:
            if budget <= 0:
                break
            n = min(seq.num_uncached, budget)
            if seq not in plan.preempted and self._grow(seq, n, in_step, plan):
                plan.prefills.append((seq, n))
                in_step.add(id(seq))
                budget -= n
        return plan

    def _admit(self) -> None:
        while self.would_admit(len(self.running), self.allocator.num_free):
            self.running.append(self.waiting.popleft())

    def would_admit(self, num_running: int, num_free: int) -> bool:
        """The admission rule: the first waiting request joins when `num_running` sequences run
        and `num_free` pages are free (first come, first served: later requests wait behind it).
        Also a dry run against a state the engine foresees (Engine._continue_with, overlap.py)."""
        if not self.waiting or num_running >= self.max_batch:
            return False
        seq = self.waiting[0]
        return pages_for(seq.num_tokens + 1, self.page_size) - len(seq.pages) <= num_free

    def pages_needed(self, seq: Sequence, n: int) -> int:
        """New pages `seq` needs for n more tokens."""
        return pages_for(seq.num_cached + n, self.page_size) - len(seq.pages)

    def grow_decodes(self, seqs: list[Sequence]) -> list[int]:
        """Pages for one more token each, which the caller made sure are free (an overlapped decode
        step: the synchronous schedule of the same step, which would preempt nothing) -> the pages
        each one got."""
        grown = []
        for seq in seqs:
            need = self.pages_needed(seq, 1)
            if need > 0:
                seq.pages.extend(self.allocator.allocate(need))
            grown.append(max(need, 0))
        return grown

    def shrink_to_cached(self, seq: Sequence) -> None:
        """Free the pages past those of seq's cached tokens (a rolled-back overlapped step's growth),
        so that the next schedule sees the pages the synchronous engine would. A new list, as on
        release (ModelRunner.decode_host's table rows rely on it)."""
        keep = pages_for(seq.num_cached, self.page_size)
        if len(seq.pages) > keep:
            self.allocator.free(seq.pages[keep:])
            seq.pages = seq.pages[:keep]

    def _grow(self, seq: Sequence, n: int, in_step: set[int], plan: StepPlan) -> bool:
        """Give `seq` pages for n more tokens, preempting younger sequences if needed.
        False: it must wait (only younger work is in this step, or nothing to preempt)."""
        need = self.pages_needed(seq, n)
        while need > self.allocator.num_free:
            victims = [s for s in reversed(self.running) if id(s) not in in_step]
            if not victims or victims[0] is seq:
                return False
            self._preempt(victims[0])
            plan.preempted.append(victims[0])
        if need > 0:
            seq.pages.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.pages)
        seq.pages, seq.num_cached = [], 0
