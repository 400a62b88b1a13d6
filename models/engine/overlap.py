"""Overlapped ("one step late") greedy decoding: the host prepares decode step t+1 while the GPU
runs step t.

A synchronous engine step is: schedule, build inputs, launch, read the tokens back (which waits
for the GPU), finish checks, outputs; the GPU idles during every host part. When all rows of a
decode step are greedy, the engine (Engine.step, EngineConfig.overlap_decode) instead runs:

  launch t   argmax on the device; a non-blocking copy of the tokens to pinned host memory with
             an event (TokenReadback); every sequence gets a PLACEHOLDER output token, so the
             scheduling arithmetic (positions, pages, max_tokens) reads as if the token were known.
             The step is kept as a PendingDecode; step() returns without waiting.
  next step  if step t+1 is "decode the same sequences again" unless a sequence stops at step t
             (Engine._continue_with, decided before the tokens are known): every running sequence
             is in step t; those that step t ends by max_tokens (known in advance) are left out;
             the scheduler's admission rule (Scheduler.would_admit, what schedule() applies) admits
             no waiting request into the batch slots and free pages there will be once step t has
             resolved if nothing stops (the max_tokens ends' pages counted as free); the pages for
             one more token each are free (no preemption). Then grow their pages and launch t+1,
             its input ids gathered on the device from step t's argmax (positions, slots, block
             tables do not depend on token values); only then wait for step t's tokens, fill the
             placeholders, run the finish checks and return step t's outputs, while the GPU runs t+1.
             Otherwise: resolve step t first, then a synchronous step (which may start a new
             pipeline). Sampled rows (temperature > 0), prefills, preemption, admissions, all go
             through that synchronous path.

A sequence that stops at step t (stop token, EOS) already has a row in step t+1. Usually that row
is just discarded when t+1 resolves (Sequence.finished): its pages are freed when step t resolves,
while t+1 may still write its row's K/V into them, which is safe because all work is queued on one
CUDA stream, so whatever reuses those pages runs after step t+1; and the discarded row does not
change the other rows' results. But step t+1 is no longer the synchronous engine's step when
  - the remaining rows decode at another shape (graph bucket), or
  - no row remains, or
  - the admission rule, applied to the batch slots and pages as the synchronous engine would see
    them after step t (the stopped sequences' freed), admits a waiting request (which then
    prefills in the step):
then step t+1 is thrown away (PendingDecode.rollback; the pages grown for it are given back, so
that the schedule sees the free pages the synchronous engine's does) and the synchronous engine's
step is run in the same step() call, from a fresh schedule: one wasted step of device time. In the
same call, so that step() call k always runs the step the synchronous engine's call k runs: a redo
left to the next call would meet the requests that arrive before it one step early, and give later
tokens other decode shapes.

Outputs come one step() call later than in the synchronous engine; tokens, finish reasons, stop
tokens (not emitted) and max_tokens are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .scheduler import Sequence

PLACEHOLDER = -1  # an output token whose value is still on the device (never fed to the model)


@dataclass
class PendingDecode:
    """A launched decode step whose tokens the host has not read yet."""

    seqs: list[Sequence]
    index: list[int]                   # where each sequence's token goes in its output_ids
    tokens: Tensor                     # [n] argmax on the device: the next step's input ids
    host: Tensor                       # [n] the same tokens on the host once `ready` completed
    ready: torch.cuda.Event | None     # None on the CPU (host is tokens)

    def token_list(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

    def rollback(self) -> None:
        """Forget this step: its live sequences are back to one uncached token (their K/V written
        by it will be written again by the step that redoes it, later on the same stream; the pages
        grown for it are the caller's: Scheduler.shrink_to_cached)."""
        for seq, i in zip(self.seqs, self.index):
            if not seq.finished:
                del seq.output_ids[i:]
                seq.num_cached -= 1


class TokenReadback:
    """Device-to-host copies of decode steps' tokens that do not block the host: into two pinned
    buffers in turn, each with an event. At most two steps are unresolved at once (the pending one
    and the one just launched); a rolled-back step's copy may still be in flight when its buffer
    comes round again, but the next copy into it is queued after it on the same stream."""

    def __init__(self, device: torch.device, max_batch: int):
        self.buffers = []
        if device.type == "cuda":
            self.buffers = [(torch.empty(max_batch, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
                            for _ in range(2)]
        self.turn = 0

    def start(self, tokens: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        if not self.buffers:
            return tokens, None
        pinned, ready = self.buffers[self.turn]
        self.turn ^= 1
        host = pinned[: tokens.numel()]
        host.copy_(tokens, non_blocking=True)
        ready.record()
        return host, ready
