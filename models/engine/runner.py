"""Runs the model over the paged cache: the prefill chunks of a step packed into one forward, or one
decode step of many sequences.

Only the last position's logits are computed (the lm_head over a whole prompt is wasted work).
Decode batches either run eagerly at their own size, or padded to a fixed bucket size with a
full-width block table: the shapes a captured CUDA graph needs (cuda_graphs.py). The padded
path also runs eagerly, which is how the CPU tests cover it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .attention import PagedBatch, shape_stable_sdpa
from .kv_cache import NULL_PAGE
from .scheduler import Sequence


class DeviceFeed(NamedTuple):
    """Input ids taken on the device from the previous step's argmax (an overlapped decode step,
    overlap.py): sequence i's input id is tokens[src[i]]."""

    tokens: Tensor   # [previous step's rows] on the device
    src: list[int]   # per sequence of this step, its row in the previous step


class ModelRunner:
    def __init__(self, model, pages, page_size: int, max_pages_per_seq: int, device: torch.device, body=None):
        """`body`: what maps (input_ids, positions, batch) to final hidden states, default the model's
        LlamaModel (fused_layers.RegroupedModel: the merged projections)."""
        self.model, self.pages, self.page_size = model, pages, page_size
        self.body = body if body is not None else model.model
        self.max_pages_per_seq, self.device = max_pages_per_seq, device

    def forward(self, input_ids: Tensor, positions: Tensor, batch: PagedBatch) -> Tensor:
        """input_ids, positions [B, T] -> fp32 logits of the last position [B, vocab] (decode: T = 1)."""
        hidden = self.body(input_ids, positions, batch)
        return self.model.lm_head(hidden[:, -1]).float()

    # ---------------------------------------------------------------- prefill

    @torch.no_grad()
    def prefill(self, chunks: list[tuple[Sequence, int]]) -> Tensor:
        """Process each sequence's next n uncached tokens (after its cached prefix), all chunks
        packed into one forward of sum(n) tokens -> logits of each chunk's last token [len(chunks), vocab].

        Packing (not padding) keeps every GEMM at M = the step's token count with no wasted rows;
        attention splits the packed tokens back into sequences (PagedBatch.segments)."""
        hidden, last = self.prefill_hidden(chunks)
        return self.model.lm_head(hidden[last]).float()

    @torch.no_grad()
    def prefill_hidden(self, chunks: list[tuple[Sequence, int]]) -> tuple[Tensor, Tensor]:
        """prefill's forward: (final hidden states of every packed token [sum(n), hidden], each
        chunk's last row in them [len(chunks)]); K and V of the chunks are written to the pages."""
        host, segments, dims = self.prefill_host(chunks)
        flat = torch.from_numpy(host)
        if self.device.type == "cuda":  # one asynchronous copy (torch.tensor from lists: one blocking copy each)
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            flat = flat.to(self.device)
        ids, positions, slots, tables, lens, last = self.split_prefill_inputs(flat, *dims)
        batch = PagedBatch(self.pages, tables, lens, slots, segments)
        with shape_stable_sdpa():  # entered once per step, not per attention call (attention.sdpa)
            hidden = self.body(ids[None], positions[None], batch)[0]   # [sum(n), hidden]
        return hidden, last

    def prefill_host(self, chunks: list[tuple[Sequence, int]]):
        """A packed prefill's inputs as one flat int64 host array: input ids, positions and slots [N]
        each, block tables [B, W] (padded with the null page), context lengths and each chunk's last
        row in the packed tokens [B] -> (the array, the chunks' (n, context), (N, B, W) for
        split_prefill_inputs)."""
        N, B, W = sum(n for _, n in chunks), len(chunks), max(len(s.pages) for s, _ in chunks)
        host = np.empty(3 * N + B * W + 2 * B, dtype=np.int64)
        ids, positions, slots, tables, lens, last = self.split_prefill_inputs(host, N, B, W)
        tables[:] = NULL_PAGE
        segments, at = [], 0
        for i, (seq, n) in enumerate(chunks):
            start = seq.num_cached
            pos = np.arange(start, start + n)
            pages = np.asarray(seq.pages, dtype=np.int64)
            ids[at:at + n] = seq.tokens[start:start + n]
            positions[at:at + n] = pos
            slots[at:at + n] = self._slots(pages, pos)
            tables[i, :len(pages)] = pages
            segments.append((n, start + n))
            at += n
        lens[:] = [c for _, c in segments]
        last[:] = np.cumsum([n for n, _ in segments]) - 1
        return host, tuple(segments), (N, B, W)

    @staticmethod
    def split_prefill_inputs(flat, N: int, B: int, W: int):
        """Views of a prefill_host array (numpy or a tensor on any device): (input_ids [N], positions [N],
        slots [N], block_tables [B, W], context_lens [B], last rows [B])."""
        ids, positions, slots = flat[:N], flat[N:2 * N], flat[2 * N:3 * N]
        tables = flat[3 * N:3 * N + B * W].reshape(B, W)
        lens, last = flat[3 * N + B * W:3 * N + B * W + B], flat[3 * N + B * W + B:]
        return ids, positions, slots, tables, lens, last

    # ----------------------------------------------------------------- decode

    def decode_host(self, seqs: list[Sequence], rows: int, width: int, out: np.ndarray | None = None,
                    written: list | None = None, src: list[int] | None = None) -> np.ndarray:
        """One decode step's inputs as one flat int64 host array: block tables [rows, width], then
        input ids, positions, context lengths, slots and source rows [rows] each (split_decode_inputs
        views it). Rows past len(seqs) are null rows (token 0 at position 0 in the null page).
        `src` (overlapped decode, overlap.py): the row of each sequence in the previous step, whose
        device-side token becomes its input id (feed_input_ids); its host input id is then a placeholder.

        `written` (with a persistent `out`, DecodeGraphs): what each row of out's block tables holds
        from earlier calls, (pages list, its length) or None for a null row; rows whose sequence and
        page count did not change are not rewritten. Sound because a sequence's page list only grows
        in place, and releasing or shrinking its pages replaces the list (Sequence.pages).

        Numpy, not nested lists into torch.tensor: this runs on the host between two decode
        steps (CUDA-graph replays), where the list version cost more than a small batch's attention;
        columns are built as lists and written at once (per-element numpy writes cost ~0.5 us each)."""
        n = len(seqs)
        host = out if out is not None else np.empty(rows * (width + 5), dtype=np.int64)
        tables = host[:rows * width].reshape(rows, width)
        cols = host[rows * width:].reshape(5, rows)
        if written is None:
            tables[:] = NULL_PAGE
            written = [None] * rows
        ids, positions, slots = [], [], []
        for i, s in enumerate(seqs):
            pos = s.num_cached
            pages = s.pages
            ids.append(s.token_at(pos))
            positions.append(pos)
            slots.append(self._slots(pages, pos))
            held, k = written[i], len(pages)
            if held is None or held[0] is not pages or held[1] > k:
                tables[i, :k] = pages
                if held is not None:
                    tables[i, k:] = NULL_PAGE
            elif held[1] < k:
                tables[i, held[1]:k] = pages[held[1]:]
            written[i] = (pages, k)
        for i in range(n, rows):
            if written[i] is not None:
                tables[i] = NULL_PAGE
                written[i] = None
        if n:
            cols[:, :n] = (ids, positions, [p + 1 for p in positions], slots, src if src is not None else [0] * n)
        cols[:, n:] = np.array([[0], [0], [1], [NULL_PAGE * self.page_size], [0]])
        return host

    @staticmethod
    def split_decode_inputs(flat: Tensor, rows: int, width: int):
        """Views of a decode_host array (on any device): (input_ids [R, 1], positions [R, 1],
        block_tables [R, W], context_lens [R], slots [R], source rows [R]), each contiguous."""
        ids, positions, lens, slots, src = flat[rows * width:].view(5, rows)
        return ids[:, None], positions[:, None], flat[:rows * width].view(rows, width), lens, slots, src

    @staticmethod
    def feed_input_ids(ids: Tensor, src: Tensor, n: int, tokens: Tensor) -> None:
        """ids[i] = tokens[src[i]] for the first n rows, on the device (no host round trip):
        an overlapped decode step's input ids are the previous step's argmax (overlap.py)."""
        torch.index_select(tokens, 0, src[:n], out=ids[:n, 0])

    def decode_inputs(self, seqs: list[Sequence], rows: int | None = None, width: int | None = None,
                      src: list[int] | None = None):
        """split_decode_inputs of one step on the device (one host-to-device copy). R = rows >=
        len(seqs) pads with null rows, W defaults to the widest table."""
        rows = rows or len(seqs)
        width = width or max(len(s.pages) for s in seqs)
        flat = torch.from_numpy(self.decode_host(seqs, rows, width, src=src)).to(self.device)
        return self.split_decode_inputs(flat, rows, width)

    @torch.no_grad()
    def decode(self, seqs: list[Sequence], rows: int | None = None, full_width: bool = False,
               feed: DeviceFeed | None = None) -> Tensor:
        """One token for each sequence -> logits [len(seqs), vocab]. rows / full_width pad the
        batch to the fixed shapes of a CUDA graph bucket (null rows are dropped). feed: input ids
        from the device (DeviceFeed) instead of the sequences' last tokens."""
        ids, positions, tables, lens, slots, src = self.decode_inputs(
            seqs, rows, self.max_pages_per_seq if full_width else None, feed.src if feed else None)
        if feed is not None:
            self.feed_input_ids(ids, src, len(seqs), feed.tokens)
        return self.forward(ids, positions, PagedBatch(self.pages, tables, lens, slots))[: len(seqs)]

    # ---------------------------------------------------------------- helpers

    def _slots(self, pages, positions):
        """Cache slot of a position: its page's id x page_size + its offset in the page (a list of
        pages and an int, or numpy arrays of both: then one slot per position)."""
        ps = self.page_size
        return pages[positions // ps] * ps + positions % ps
