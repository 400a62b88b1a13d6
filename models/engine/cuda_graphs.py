"""CUDA-graph-captured decode steps, one graph per fixed batch bucket (GPU only).

A decode step of a small model is mostly kernel-launch overhead; replaying a captured graph
removes it. Each bucket B captures `ModelRunner.forward` on static input buffers of shape
[B, 1] with a full-width block table [B, max_pages_per_seq], all views of one flat buffer; a
batch of n <= B sequences is written into its pinned host twin, padded with null rows
(ModelRunner.decode_host), copied with one host-to-device copy, and replayed.
Sampling stays outside the graph. An overlapped step (overlap.py) takes its input ids from the
previous step's argmax on the device: one gather between the copy and the replay.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ..llama import rope_type
from .attention import PagedBatch
from .kv_cache import NULL_PAGE
from .runner import DeviceFeed, ModelRunner
from .scheduler import Sequence

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def decode_buckets(buckets, max_batch: int) -> list[int]:
    """The padded decode batch sizes: the configured buckets below max_batch, and max_batch."""
    return sorted({b for b in buckets if b < max_batch} | {max_batch})


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest of the (sorted) buckets that holds n rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"decode batch {n} exceeds the largest bucket {buckets[-1]}")


def check_graphable(runner: ModelRunner) -> None:
    if runner.device.type != "cuda":
        raise ValueError("CUDA-graph decode needs a CUDA device; turn cuda_graphs off on the CPU")
    if rope_type(runner.model.config) == "dynamic":
        # dynamic NTK RoPE reads positions.max() on the host, which cannot be captured
        raise ValueError("CUDA-graph decode does not support rope_scaling type 'dynamic'")


@contextmanager
def collector_held_off():
    """Collect once, then keep Python's automatic garbage collection off until the block ends.
    Why: a collection that runs mid-capture may free a dead engine's graphs (held in a reference
    cycle), and their reset is an operation a capturing stream does not permit: it invalidates the
    capture (cudaErrorStreamCaptureInvalidated). Seen on the H100 when test_rope ran before
    test_engine: allocation counts moved a collection into the kv4 capture."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class BucketGraph:
    """One bucket's captured decode step and the buffers a replay refills."""

    graph: torch.cuda.CUDAGraph
    pinned: Tensor           # pinned host twin of `flat` (ModelRunner.decode_host writes it)
    written: list            # decode_host's record of what pinned's table rows hold
    copied: torch.cuda.Event  # recorded after the last host-to-device copy out of `pinned`
    flat: Tensor             # all device inputs, one buffer (ModelRunner.split_decode_inputs)
    ids: Tensor              # flat's input-id view
    src: Tensor              # flat's source-row view (device-fed ids, overlap.py)
    logits: Tensor           # the graph's output


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, buckets=DEFAULT_BUCKETS):
        check_graphable(runner)
        self.runner = runner
        self.buckets = decode_buckets(buckets, max_batch)
        self.graphs: dict[int, BucketGraph] = {}  # by rows
        self.pool = None

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        with collector_held_off():
            for rows in sorted(self.buckets, reverse=True):
                self._capture_bucket(rows)

    def _capture_bucket(self, rows: int) -> None:
        """Static input buffers for `rows`, a warm-up, the capture (self.graphs[rows])."""
        r = self.runner
        # One flat buffer for all inputs (ModelRunner.decode_host's layout): a step refills it
        # with one host-to-device copy from a pinned twin.
        width = r.max_pages_per_seq
        flat = torch.zeros(rows * (width + 5), dtype=torch.int64, device=r.device)
        ids, positions, tables, lens, slots, src = r.split_decode_inputs(flat, rows, width)
        lens.fill_(1)
        pinned = torch.full(flat.shape, NULL_PAGE, dtype=torch.int64, pin_memory=True)
        written = [None] * rows  # decode_host's record of pinned's table rows: all null
        batch = PagedBatch(r.pages, tables, lens, slots)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (lazy inits, autotuning) off the capture
            for _ in range(2):
                r.forward(ids, positions, batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = r.forward(ids, positions, batch)
        self.pool = graph.pool()
        self.graphs[rows] = BucketGraph(graph, pinned, written, torch.cuda.Event(), flat, ids, src, logits)

    @torch.no_grad()
    def decode(self, seqs: list[Sequence], feed: DeviceFeed | None = None) -> Tensor:
        """Replay the bucket's graph for seqs -> logits [len(seqs), vocab] (a view of the graph's
        output: read it before the next replay of this bucket). feed: as
        ModelRunner.decode, gathered on the device after the copy, before the replay."""
        rows = bucket_for(self.buckets, len(seqs))
        g = self.graphs[rows]
        g.copied.synchronize()  # the previous step's copy out of the pinned buffer is done
        self.runner.decode_host(seqs, rows, self.runner.max_pages_per_seq, out=g.pinned.numpy(), written=g.written,
                                src=feed.src if feed else None)
        g.flat.copy_(g.pinned, non_blocking=True)
        g.copied.record()
        if feed is not None:
            self.runner.feed_input_ids(g.ids, g.src, len(seqs), feed.tokens)
        g.graph.replay()
        return g.logits[: len(seqs)]
