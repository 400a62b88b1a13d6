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

import torch
from torch import Tensor

from ..llama import rope_type
from .attention import PagedBatch
from .kv_cache import NULL_PAGE
from .runner import ModelRunner
from .scheduler import Sequence

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def check_graphable(runner: ModelRunner) -> None:
    if runner.device.type != "cuda":
        raise ValueError("CUDA-graph decode needs a CUDA device; turn cuda_graphs off on the CPU")
    if rope_type(runner.model.config) == "dynamic":
        # dynamic NTK RoPE reads positions.max() on the host, which cannot be captured
        raise ValueError("CUDA-graph decode does not support rope_scaling type 'dynamic'")


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, buckets=DEFAULT_BUCKETS):
        check_graphable(runner)
        self.runner = runner
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        # rows -> (graph, pinned host twin of the inputs, what its table rows hold (decode_host),
        #          event after its last copy, flat device inputs, their ids and src views, logits)
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        for rows in sorted(self.buckets, reverse=True):
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
            self.graphs[rows] = (graph, pinned, written, torch.cuda.Event(), flat, ids, src, logits)

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"decode batch {n} exceeds the largest captured bucket {self.buckets[-1]}")

    @torch.no_grad()
    def decode(self, seqs: list[Sequence], feed: tuple[Tensor, list[int]] | None = None) -> Tensor:
        """Replay the bucket's graph for seqs -> logits [len(seqs), vocab] (a view of the graph's
        output: read it before the next replay of this bucket). feed = (tokens, src): as
        ModelRunner.decode, gathered on the device after the copy, before the replay."""
        rows = self.bucket_for(len(seqs))
        graph, pinned, written, copied, flat, ids, src, logits = self.graphs[rows]
        copied.synchronize()  # the previous step's copy out of the pinned buffer is done
        self.runner.decode_host(seqs, rows, self.runner.max_pages_per_seq, out=pinned.numpy(), written=written,
                                src=feed[1] if feed else None)
        flat.copy_(pinned, non_blocking=True)
        copied.record()
        if feed is not None:
            self.runner.feed_input_ids(ids, src, len(seqs), feed[0])
        graph.replay()
        return logits[: len(seqs)]
