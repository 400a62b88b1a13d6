"""The serving engine: requests in, tokens out, one `step()` at a time (synchronous, one thread).

    engine = Engine(model, EngineConfig(max_batch=8), eos_token_ids=[tok.eos_id])
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_work():
        for out in engine.step(): ...

Requests may be added between any two steps (continuous batching). A request the engine
cannot serve raises RequestError from add_request and leaves the engine untouched; a failure
inside a step fails the requests of that step with the message and frees their pages, and the
engine goes on. EngineLoop (loop.py) runs this in a background thread for the server.

With overlap_decode (on by default with cuda_graphs), greedy decode steps run one step late: a
step launches the next decode on the device before reading the previous one's tokens, so its
outputs come from the next step() call, the same outputs as without it (overlap.py).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..llama import rope_type
from .cuda_graphs import DEFAULT_BUCKETS, DecodeGraphs, bucket_for, decode_buckets
from .fused_layers import fuse_atom_layers, merge_projections
from .kv_cache import PageAllocator, make_pages, page_bytes, pages_for
from .overlap import PLACEHOLDER, PendingDecode, TokenReadback
from .runner import DeviceFeed, ModelRunner
from .sampling import RequestError, SamplingParams, make_generator, sample_batch
from .scheduler import Scheduler, Sequence

DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16                   # sequences decoded together
    page_size: int = 16                   # tokens per KV page
    max_context: int | None = None        # prompt + output; default min(model's, 4096)
    num_pages: int | None = None          # default: max_batch full-context sequences within kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    max_prefill_tokens: int = 2048        # prefill tokens per step (all chunks, packed in one forward)
    cuda_graphs: bool = False             # capture decode steps per batch bucket (GPU only)
    graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    static_decode_shapes: bool = False    # pad decode like the graphs do, without capturing (tests)
    overlap_decode: bool | None = None    # greedy decode steps one step late (overlap.py); None: with
                                          # cuda_graphs. Without graphs it pads like static_decode_shapes
    regroup_layers: bool = True           # one GEMM per projection group (q|k|v, gate|up) in every mode:
                                          # fused Atom layers, merged fp16 / fp8 projections (fused_layers.py)

    def __post_init__(self):
        for name in ("max_batch", "page_size", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None      # "stop", "length", "abort", "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    """A finished request, as Engine.generate returns it."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), eos_token_ids=()):
        self.model, self.config = model.eval(), config
        param = next(model.parameters())
        self.device, self.dtype = param.device, model.model.embed_tokens.weight.dtype
        cfg = model.config
        self.max_context = config.max_context or min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if rope_type(cfg) == "dynamic" and self.max_context > cfg.max_position_embeddings:
            # past that length dynamic NTK RoPE rescales with the longest position in the batch,
            # so a sequence's positions would depend on which others share its decode step
            raise ValueError(f"max_context {self.max_context} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings} with dynamic RoPE scaling; the engine does not support that")
        self.pages_per_seq = pages_for(self.max_context, config.page_size)
        num_pages = config.num_pages or self._default_num_pages()
        if num_pages - 1 < self.pages_per_seq:
            raise ValueError(f"{num_pages} KV pages (one reserved) cannot hold one {self.max_context}-token "
                             f"sequence ({self.pages_per_seq} pages of {config.page_size}); raise num_pages "
                             f"or kv_cache_bytes, or lower max_context")
        self.pages = make_pages(model, num_pages, config.page_size, self.dtype, self.device)
        self.allocator = PageAllocator(num_pages)
        self.scheduler = Scheduler(self.allocator, config.page_size, config.max_batch, config.max_prefill_tokens)
        self.fused = (fuse_atom_layers(model) or merge_projections(model)) if config.regroup_layers else None
        self.runner = ModelRunner(model, self.pages, config.page_size, self.pages_per_seq, self.device, self.fused)
        self.graphs = None
        if config.cuda_graphs:
            self.graphs = DecodeGraphs(self.runner, config.max_batch, config.graph_buckets)
            self.graphs.capture()
        self.overlap = config.cuda_graphs if config.overlap_decode is None else config.overlap_decode
        # decode pads to the bucket shapes with graphs, when overlapped, and when asked (CPU tests of those shapes)
        self._pad_decode = config.static_decode_shapes or self.overlap or self.graphs is not None
        self._buckets = decode_buckets(config.graph_buckets, config.max_batch)  # the same as DecodeGraphs'
        self._readback = TokenReadback(self.device, config.max_batch)
        self._pending: PendingDecode | None = None  # a launched decode step whose tokens are not read yet
        self.eos_token_ids = frozenset(t for t in eos_token_ids if t is not None)
        self._ids = itertools.count()
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "preemptions": 0,
                      # overlap.py: steps launched before the previous one's tokens were read, rows of
                      # finished (stopped, aborted) sequences dropped from them, launched steps thrown
                      # away and run again synchronously (another shape, or a stop admits a request)
                      "overlapped_steps": 0, "discarded_rows": 0, "redone_steps": 0}

    @property
    def kv_format(self) -> str:
        return self.pages.kind

    def _default_num_pages(self) -> int:
        per_page = page_bytes(self.model, self.config.page_size, self.dtype)
        wanted = self.config.max_batch * self.pages_per_seq + 1
        affordable = self.config.kv_cache_bytes // per_page
        return max(min(wanted, affordable), self.pages_per_seq + 1)

    # --------------------------------------------------------------- requests

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError unless the engine can serve this request (reads only settings:
        safe to call from another thread)."""
        params.validate()
        if not prompt_ids:
            raise RequestError("the prompt is empty (it encodes to no tokens)")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this engine's context is "
                               f"{self.max_context} tokens (prompt + at least one generated token)")

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        self.validate(prompt_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if self.scheduler.find(request_id) is not None:
            raise RequestError(f"request id {request_id!r} is already in use")
        max_tokens = min(params.max_tokens, self.max_context - len(prompt_ids))
        seq = Sequence(request_id, list(prompt_ids), params, max_tokens, make_generator(params))
        seq.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request (client gone) and free its pages; False if it is not here."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        seq.finished = True  # a pending step's token for it is dropped
        self.scheduler.remove(seq)
        return True

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one step; returns what it produced. With overlap_decode, a greedy decode step's
        outputs come from the next call instead (overlap.py)."""
        self.stats["steps"] += 1
        pending, self._pending = self._pending, None
        outputs: list[RequestOutput] = []
        if pending is not None:
            try:
                nxt = self._continue_with(pending)
                if nxt:
                    return self._overlapped_step(pending, nxt)
                outputs = self._resolve(pending)  # the finish checks before the next schedule
            except Exception as e:  # noqa: BLE001 - as in _scheduled_step
                return self._fail(pending.seqs, e)
        return outputs + self._scheduled_step()

    def _scheduled_step(self) -> list[RequestOutput]:
        """A step from a fresh schedule: prefills and decodes, synchronously; or, for an all-greedy
        decode-only plan with overlap on, launch it and leave it pending (its outputs come next step)."""
        plan = self.scheduler.schedule()
        self.stats["preemptions"] += len(plan.preempted)
        sampled: list[Sequence] = []
        try:
            if plan.decodes and not plan.prefills and self._overlappable(plan.decodes):
                self._pending = self._launch_decode(plan.decodes)  # its outputs: next step
                return []
            if plan.decodes:
                logits = self._decode(plan.decodes)
                for seq in plan.decodes:
                    seq.num_cached += 1
                self.stats["decode_tokens"] += len(plan.decodes)
                sampled += self._sample(plan.decodes, logits)
            if plan.prefills:
                logits = self.runner.prefill(plan.prefills)
                for seq, n in plan.prefills:
                    seq.num_cached += n
                    self.stats["prefill_tokens"] += n
                done = [i for i, (seq, _) in enumerate(plan.prefills) if seq.num_uncached == 0]
                if done:  # whole prompts are in: their first new tokens
                    sampled += self._sample([plan.prefills[i][0] for i in done], logits[done])
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the engine
            self._pending = None
            return self._fail(plan.decodes + [s for s, _ in plan.prefills], e)
        return [self._finish_check(seq) for seq in sampled]

    def _fail(self, seqs: list[Sequence], e: Exception) -> list[RequestOutput]:
        failed = [s for s in seqs if not s.finished]
        for seq in failed:
            seq.finished = True
            self.scheduler.remove(seq)
            while seq.output_ids and seq.output_ids[-1] == PLACEHOLDER:  # tokens of steps never read
                seq.output_ids.pop()
        return [RequestOutput(s.request_id, [], True, "error", f"{type(e).__name__}: {e}",
                              len(s.prompt_ids), len(s.output_ids)) for s in failed]

    def _decode_rows(self, n: int) -> int:
        """The rows a decode step of n sequences runs with (its bucket, or n when unpadded)."""
        return bucket_for(self._buckets, n) if self._pad_decode else n

    def _decode(self, seqs: list[Sequence], feed: DeviceFeed | None = None) -> torch.Tensor:
        """Logits [len(seqs), vocab]; feed as in ModelRunner.decode."""
        if self.graphs is not None:
            return self.graphs.decode(seqs, feed)
        if self._pad_decode:
            return self.runner.decode(seqs, rows=self._decode_rows(len(seqs)), full_width=True, feed=feed)
        return self.runner.decode(seqs, feed=feed)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        tokens = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, tok in zip(seqs, tokens):
            seq.output_ids.append(tok)
        return seqs

    def _finish_check(self, seq: Sequence, i: int | None = None) -> RequestOutput:
        """Finish checks of the token output_ids[i]: the last one, or a pending step's (overlap.py),
        which may have the next step's placeholder after it."""
        if i is None:
            i = len(seq.output_ids) - 1
        tok = seq.output_ids[i]
        out = RequestOutput(seq.request_id, [tok], prompt_tokens=len(seq.prompt_ids), completion_tokens=i + 1)
        if tok in seq.stop_ids:
            del seq.output_ids[i:]  # the stop token is not part of the completion (nor a later placeholder)
            out.new_token_ids, out.finished, out.finish_reason, out.completion_tokens = [], True, "stop", i
        elif i + 1 >= seq.max_tokens:
            out.finished, out.finish_reason = True, "length"
        if out.finished:
            seq.finished = True
            self.scheduler.remove(seq)
        return out

    # ------------------------------------------------- overlapped decode (overlap.py)

    def _overlappable(self, seqs: list[Sequence]) -> bool:
        return self.overlap and all(s.params.temperature <= 0 for s in seqs)

    def _launch_decode(self, seqs: list[Sequence], prev: PendingDecode | None = None) -> PendingDecode:
        """Queue a greedy decode step and the copy of its tokens to the host, without waiting. With
        `prev` (the pending step that contains every one of seqs), the input ids are prev's tokens."""
        feed = None
        if prev is not None:
            row = {id(s): i for i, s in enumerate(prev.seqs)}
            feed = DeviceFeed(prev.tokens, [row[id(s)] for s in seqs])
        tokens = self._decode(seqs, feed).argmax(dim=-1)  # the same argmax as sample_batch's greedy rows
        host, ready = self._readback.start(tokens)
        index = []
        for seq in seqs:
            seq.num_cached += 1
            index.append(len(seq.output_ids))
            seq.output_ids.append(PLACEHOLDER)
        return PendingDecode(seqs, index, tokens, host, ready)

    def _continue_with(self, pending: PendingDecode) -> list[Sequence] | None:
        """The sequences of the next decode step, if it can be launched before `pending`'s tokens
        are known: what the synchronous engine's schedule would decode next, unless some sequence
        stops at `pending`'s step (_overlapped_step checks that). None: resolve `pending` first."""
        live = [s for s in pending.seqs if not s.finished]
        if len(live) != len(self.scheduler.running):  # a running sequence is prefilling or waits for pages
            return None
        nxt = [s for s in live if len(s.output_ids) < s.max_tokens]  # the others end by length
        freed = sum(len(s.pages) for s in live if len(s.output_ids) >= s.max_tokens)  # when pending resolves
        if self.scheduler.would_admit(len(nxt), self.allocator.num_free + freed):
            return None                 # the schedule admits a request, even if no sequence stops
        if not nxt or sum(self.scheduler.pages_needed(s, 1) for s in nxt) > self.allocator.num_free:
            return None                 # nothing to decode, or the schedule would preempt
        return nxt

    def _overlapped_step(self, pending: PendingDecode, nxt: list[Sequence]) -> list[RequestOutput]:
        grown = self.scheduler.grow_decodes(nxt)
        launched = self._launch_decode(nxt, pending)
        self.stats["overlapped_steps"] += 1
        outputs = self._resolve(pending)  # waits for pending's tokens while the device runs `launched`
        stopped = sum(s.finished for s in nxt)
        if not stopped:
            self._pending = launched
            return outputs
        # Some rows stopped at pending's step: launched is still the synchronous engine's next step
        # (less those rows, discarded when it resolves) unless that decodes the others at another
        # shape, decodes nothing, or admits a waiting request into the pages and slot they freed.
        left = len(nxt) - stopped
        admits = self.scheduler.would_admit(
            left, self.allocator.num_free + sum(g for s, g in zip(nxt, grown) if not s.finished))
        if left and not admits and self._decode_rows(left) == self._decode_rows(len(nxt)):
            self._pending = launched
            return outputs
        launched.rollback()  # throw it away and run the synchronous engine's step now
        for seq in nxt:
            if not seq.finished:
                self.scheduler.shrink_to_cached(seq)
        self.stats["discarded_rows"] += stopped
        self.stats["redone_steps"] += left > 0
        return outputs + self._scheduled_step()

    def _resolve(self, pending: PendingDecode) -> list[RequestOutput]:
        """Read `pending`'s tokens (waits for its step) into its placeholders; finish checks."""
        outputs = []
        for seq, i, tok in zip(pending.seqs, pending.index, pending.token_list()):
            if seq.finished:  # stopped at the step before (this row is the extra one), or aborted
                self.stats["discarded_rows"] += 1
                continue
            seq.output_ids[i] = tok
            outputs.append(self._finish_check(seq, i))
        self.stats["decode_tokens"] += len(outputs)
        return outputs

    # ------------------------------------------------------------ convenience

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[Completion]:
        """Run prompts to completion together (continuous batching); results in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results = {rid: Completion(rid) for rid in ids}
        while any(r.finish_reason is None for r in results.values()):
            for out in self.step():
                if out.request_id in results:
                    r = results[out.request_id]
                    r.token_ids += out.new_token_ids
                    if out.finished:
                        r.finish_reason, r.error = out.finish_reason, out.error
        return [results[rid] for rid in ids]


def timed_generate(engine: Engine, prompts: list[list[int]], params: SamplingParams):
    """-> (completions, seconds, generated tokens): for the CLI's tokens/s line."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = engine.generate(prompts, params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return done, time.perf_counter() - t0, sum(len(c.token_ids) for c in done)
