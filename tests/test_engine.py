"""The serving engine on a tiny random Llama (CPU): paged attention against the plain forward,
continuous batching against one-at-a-time decoding (float and KV4 pages), page exhaustion,
request errors, sampling, stop tokens, overlapped (one step late) decoding against the synchronous
engine; `gpu` tests for the three modes, CUDA graphs and overlapped graph decode."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from models.config import LlamaConfig
from models.engine import Engine, EngineConfig, RequestError, SamplingParams
from models.engine.cuda_graphs import collector_held_off
from models.engine.kv_cache import NULL_PAGE, pages_for
from models.engine.scheduler import Sequence
from models.engine.text import TextStream, render_chat
from models.llama import LlamaForCausalLM
from models.quantized_linear import KV4Quantizer

KV_FORMATS = ("float", "kv4")


def random_model(config: LlamaConfig, kv_format: str = "float", seed: int = 0) -> LlamaForCausalLM:
    """Random weights large enough for peaked, position-dependent attention; kv4 adds the
    pipeline's KV4 quantizer, which makes the engine use KV4 pages."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    if kv_format == "kv4":
        for layer in model.model.layers:
            layer.self_attn.kv_quantizer = KV4Quantizer(128)
    return model


def prompts(vocab: int, lengths=(5, 11, 3, 8, 14), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def one_at_a_time(model, config: EngineConfig, ps: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt alone through a fresh batch-of-one engine: the reference for batching."""
    engine = Engine(model, dataclasses.replace(config, max_batch=1))
    return [engine.generate([p], params)[0].token_ids for p in ps]


def full_recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# --------------------------------------------------------------------------- paged attention

@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_paged_attention_matches_plain_forward(tiny_config, kv_format):
    """Chunked prefill over a cached prefix, then decode steps of two sequences of different
    lengths in one batch (eager and padded to graph shapes): the logits equal the model's plain
    forward over the whole sequence (which applies the same KV4 quantizer in kv4)."""
    model = random_model(tiny_config, kv_format)
    engine = Engine(model, EngineConfig(page_size=4, max_context=64, max_batch=4))
    assert engine.kv_format == kv_format
    ps = prompts(tiny_config.vocab_size, (11, 6))
    seqs = [Sequence(f"s{i}", p, SamplingParams(), 32, None) for i, p in enumerate(ps)]
    check_runner_matches_plain(model, engine, seqs, ([5, 3, 3], [6]), steps=6, rtol=1e-4)


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_packed_prefill_attends_equal_chunks_together(tiny_config, kv_format, monkeypatch):
    """Consecutive chunks of one length and context (fresh prompts: causal; chunks over equal cached
    prefixes: masked) take one attention call per run of them, with the logits of one call per chunk."""
    import models.engine.attention as attention

    model = random_model(tiny_config, kv_format)
    ps = prompts(tiny_config.vocab_size, (6, 6, 9, 6))
    chunks = ([3, 3], [3, 3], [5, 4], [6])
    batch_rows, paged_attention = [], attention.paged_attention

    def counting_attention(q, *args):
        batch_rows.append(q.shape[0])
        return paged_attention(q, *args)

    def prefill_rounds():
        engine = Engine(model, EngineConfig(page_size=4, max_context=64, max_batch=4))
        seqs = [Sequence(f"s{i}", p, SamplingParams(), 32, None) for i, p in enumerate(ps)]
        for seq in seqs:
            seq.pages = engine.allocator.allocate(pages_for(seq.num_tokens, 4))
        rounds = []
        for r in range(2):
            step = [(seqs[i], c[r]) for i, c in enumerate(chunks) if r < len(c)]
            rounds.append(engine.runner.prefill(step))
            for seq, n in step:
                seq.num_cached += n
        return rounds

    monkeypatch.setattr(attention, "paged_attention", counting_attention)
    grouped = prefill_rounds()
    # round 0: (n, context) = (3, 3) (3, 3) | (5, 5) | (6, 6); round 1: (3, 6) (3, 6) | (4, 9)
    layers = tiny_config.num_hidden_layers
    assert batch_rows == [2, 1, 1] * layers + [2, 1] * layers
    batch_rows.clear()
    monkeypatch.setattr(attention, "equal_segment_runs",
                        lambda segments: [(row, 1, n, context) for row, (n, context) in enumerate(segments)])
    one_per_chunk = prefill_rounds()
    assert batch_rows == [1, 1, 1, 1] * layers + [1, 1, 1] * layers
    assert all(torch.equal(got, want) for got, want in zip(grouped, one_per_chunk))


def check_runner_matches_plain(model, engine, seqs, chunks, steps: int, rtol: float) -> None:
    """Prefill each sequence in its `chunks` over the paged cache (the r-th chunks of all sequences packed
    into one prefill forward: a chunk with and one without a cached prefix), then `steps` decode steps of all of
    them in one batch (odd steps padded to the CUDA-graph shapes: 4 rows, full-width tables): every
    step's logits are within rtol * max(1, max |ref|) of the model's plain forward over the whole
    sequence. Shared by the CPU test above and tests/test_attention.py's GPU one."""
    device = next(model.parameters()).device
    runner, page_size = engine.runner, engine.config.page_size

    def plain(seq):
        with torch.no_grad():
            return model(torch.tensor([seq.tokens], device=device))[0]

    def close(a, b):
        assert (a.float() - b.float()).abs().max() <= rtol * max(1.0, float(b.abs().max())), (a - b).abs().max()

    refs = [plain(seq) for seq in seqs]
    for seq in seqs:
        seq.pages = engine.allocator.allocate(pages_for(seq.num_tokens + 8, page_size))
    for r in range(max(map(len, chunks))):  # round r packs every sequence's r-th chunk into one forward
        step = [(i, c[r]) for i, c in enumerate(chunks) if r < len(c)]
        logits = runner.prefill([(seqs[i], n) for i, n in step])
        for (i, n), row in zip(step, logits):
            seqs[i].num_cached += n
            close(row, refs[i][seqs[i].num_cached - 1])
    for step in range(steps):
        for seq, tok in zip(seqs, (7 + step, 20 + step)):
            seq.output_ids.append(tok)
        refs = [plain(s)[-1] for s in seqs]
        padded = step % 2 == 1
        logits = runner.decode(seqs, rows=4 if padded else None, full_width=padded)
        for seq, row, ref in zip(seqs, logits, refs):
            seq.num_cached += 1
            close(row, ref)


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_engine_attention_keeps_cudnn_out(tiny_config, kv_format, monkeypatch):
    """Every SDPA call of the engine (packed prefill with and without a cached prefix, decode) runs
    with cuDNN's backend off (it builds a plan per new prompt length), and the process-wide setting
    is back as it was after each step."""
    import models.engine.attention as attention

    seen, sdpa = [], attention.F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    torch.backends.cuda.enable_cudnn_sdp(True)
    engine = Engine(random_model(tiny_config, kv_format), EngineConfig(page_size=4, max_context=64,
                                                                       max_prefill_tokens=8))
    engine.generate(prompts(tiny_config.vocab_size, (5, 11, 3)), SamplingParams(max_tokens=3, ignore_eos=True))
    assert seen and not any(seen)  # chunks of 8 tokens: prefixes cached, a masked call among them
    assert torch.backends.cuda.cudnn_sdp_enabled()
    # backends the process turned off stay off (only cuDNN is taken out)
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        with attention.shape_stable_sdpa():
            assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)


def test_prefill_host_layout(tiny_config):
    """prefill_host's flat array, through split_prefill_inputs: the chunks' tokens, positions and
    cache slots packed in order, null-padded block tables, context lengths, each chunk's last row."""
    engine = Engine(random_model(tiny_config), EngineConfig(page_size=4, max_context=64, max_batch=4))
    a = Sequence("a", list(range(10, 20)), SamplingParams(), 32, None)  # 10 tokens, 6 cached: chunk of 3
    b = Sequence("b", [5, 6], SamplingParams(), 32, None)               # 2 tokens, none cached
    a.pages, b.pages, a.num_cached = [7, 3, 9], [2], 6
    host, segments, dims = engine.runner.prefill_host([(a, 3), (b, 2)])
    ids, positions, slots, tables, lens, last = engine.runner.split_prefill_inputs(host, *dims)
    assert segments == ((3, 9), (2, 2)) and dims == (5, 2, 3)
    assert ids.tolist() == [16, 17, 18, 5, 6] and positions.tolist() == [6, 7, 8, 0, 1]
    assert slots.tolist() == [3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 2 * 4 + 0, 2 * 4 + 1]
    assert tables.tolist() == [[7, 3, 9], [2, NULL_PAGE, NULL_PAGE]]
    assert lens.tolist() == [9, 2] and last.tolist() == [2, 4] and len(host) == 3 * 5 + 2 * 3 + 2 * 2


def test_decode_host_row_cache_matches_a_fresh_build(tiny_config):
    """decode_host into a persistent buffer with its `written` record (what DecodeGraphs does) gives the
    same array as a fresh build, through pages growing, rows changing hands, released and re-allocated
    page lists, and the batch shrinking and growing."""
    import numpy as np

    engine = Engine(random_model(tiny_config), EngineConfig(page_size=4, max_context=64, max_batch=4))
    runner, alloc, rows, width = engine.runner, engine.allocator, 4, engine.pages_per_seq
    seqs = [Sequence(f"s{i}", list(range(1, 3 + 3 * i)), SamplingParams(), 32, None) for i in range(4)]
    for s in seqs:
        s.pages = alloc.allocate(pages_for(s.num_tokens, 4))
        s.num_cached = s.num_tokens - 1
    out, written = np.full(rows * (width + 5), 7, dtype=np.int64), [None] * rows
    out[:rows * width] = NULL_PAGE  # as DecodeGraphs initialises its pinned buffer

    def check(batch):
        got = runner.decode_host(batch, rows, width, out=out, written=written).copy()
        assert np.array_equal(got, runner.decode_host(batch, rows, width))

    check(seqs)
    for step in range(6):  # every sequence grows by one token (a new page every 4)
        for s in seqs:
            s.output_ids.append(step)
            s.num_cached += 1
            s.pages.extend(alloc.allocate(pages_for(s.num_cached + 1, 4) - len(s.pages)))
        check(seqs)
    check(seqs[1:])                      # a row finished: the others move up
    check([seqs[3], seqs[1]])
    alloc.free(seqs[1].pages)            # released and given other pages, as many
    held = alloc.allocate(1)
    seqs[1].pages = alloc.allocate(len(seqs[1].pages))
    alloc.free(held)
    check([seqs[3], seqs[1]])
    check(seqs)


# ------------------------------------------------------------------------ continuous batching

@pytest.mark.parametrize("static_shapes", [False, True, "overlap"], ids=["eager", "graph_shapes", "overlap"])
@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_continuous_batching_matches_one_at_a_time(tiny_config, kv_format, static_shapes):
    model = random_model(tiny_config, kv_format)
    config = EngineConfig(max_batch=3, page_size=4, max_context=64, max_prefill_tokens=6,
                          static_decode_shapes=static_shapes is True, graph_buckets=(1, 2, 4),
                          overlap_decode=static_shapes == "overlap")
    ps, params = prompts(tiny_config.vocab_size), SamplingParams(max_tokens=9)
    expected = one_at_a_time(model, config, ps, params)
    if kv_format == "float":  # and the cache changes nothing: same as recomputing every step
        assert expected == [full_recompute_greedy(model, p, 9) for p in ps]

    engine = Engine(model, config)
    got: dict[str, list[int]] = {}
    ids, pending, max_running = [], list(ps), 0
    while pending or engine.has_work():
        if pending:  # a new request joins between every two steps
            ids.append(engine.add_request(pending.pop(0), params))
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        max_running = max(max_running, engine.num_running)
    assert max_running == 3  # really batched (and capped by max_batch)
    assert [got[i] for i in ids] == expected
    assert (engine.stats["overlapped_steps"] > 0) == (static_shapes == "overlap")
    assert engine.allocator.num_free == engine.allocator.capacity  # finished requests freed their pages


def test_page_exhaustion_queues_and_preempts_instead_of_failing(tiny_config):
    """A pool that holds about one and a half full sequences: requests wait in the queue, the
    youngest running one is preempted and recomputed later; every request completes with the
    same tokens as alone."""
    model = random_model(tiny_config)
    config = EngineConfig(max_batch=4, page_size=4, max_context=32, num_pages=13)
    ps, params = prompts(tiny_config.vocab_size, (6, 9, 4, 12)), SamplingParams(max_tokens=20)
    expected = one_at_a_time(model, config, ps, params)
    engine = Engine(model, config)
    ids = [engine.add_request(p, params) for p in ps]
    got, max_waiting = {i: [] for i in ids}, 0
    while engine.has_work():
        for out in engine.step():
            assert out.error is None
            got[out.request_id] += out.new_token_ids
        max_waiting = max(max_waiting, engine.num_waiting)
    assert max_waiting > 0 and engine.stats["preemptions"] > 0
    assert [got[i] for i in ids] == expected
    assert engine.allocator.num_free == 12


def test_bad_requests_fail_clearly_and_the_engine_keeps_running(tiny_config):
    model = random_model(tiny_config)
    engine = Engine(model, EngineConfig(max_context=16, page_size=4))
    good = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="prompt has 16 tokens.*context is 16"):
        engine.add_request(list(range(16)))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([])
    with pytest.raises(RequestError, match="integers in"):
        engine.add_request([tiny_config.vocab_size])
    for bad in (SamplingParams(max_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0)):
        with pytest.raises(RequestError):
            engine.add_request([1], bad)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == [good]
    # max_tokens beyond the context is capped: 13 prompt tokens leave room for 3
    done = engine.generate([list(range(13))], SamplingParams(max_tokens=50))[0]
    assert len(done.token_ids) == 3 and done.finish_reason == "length"


def test_engine_config_errors(tiny_config):
    model = random_model(tiny_config)
    with pytest.raises(ValueError, match="cannot hold one 64-token sequence"):
        Engine(model, EngineConfig(page_size=4, max_context=64, num_pages=10))
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, EngineConfig(cuda_graphs=True))


def test_stop_tokens_max_tokens_and_abort(tiny_config):
    model = random_model(tiny_config)
    engine = Engine(model, EngineConfig(page_size=4, max_context=64))
    p = prompts(tiny_config.vocab_size)[1]
    free = engine.generate([p], SamplingParams(max_tokens=12))[0].token_ids
    stop = free[4]
    cut = free.index(stop)
    done = engine.generate([p], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))[0]
    assert done.token_ids == free[:cut] and done.finish_reason == "stop"
    eos_engine = Engine(model, EngineConfig(page_size=4, max_context=64), eos_token_ids=[stop])
    assert eos_engine.generate([p], SamplingParams(max_tokens=12))[0].token_ids == free[:cut]
    ignored = eos_engine.generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"

    rid = engine.add_request(p, SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.abort(rid) and not engine.has_work() and not engine.abort(rid)
    assert engine.allocator.num_free == engine.allocator.capacity


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_config):
    model = random_model(tiny_config)
    engine = Engine(model, EngineConfig(page_size=4, max_context=64))
    ps = prompts(tiny_config.vocab_size)
    sampled = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=s) for s in range(len(ps))]
    batched = [c.token_ids for c in engine.generate(ps, sampled)]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(ps, sampled)]
    assert batched == alone
    greedy = engine.generate(ps[:1], SamplingParams(max_tokens=10))[0].token_ids
    other_seed = engine.generate(ps[:1], dataclasses.replace(sampled[0], seed=99))[0].token_ids
    assert batched[0] != greedy or other_seed != batched[0]  # sampling really samples


# ------------------------------------------------------------- overlapped decode (overlap.py)

def run_engine(engine, arrivals: dict, abort_at: dict | None = None):
    """Step `engine` until idle, adding arrivals[k] = [(request id, prompt, params), ...] and aborting
    abort_at[k] = [request id, ...] before the k-th step -> ({request id: [output fields, ...]}, the
    rows each decode row ran with {(request id, position): rows}). Sets engine.overlapped_with_queue:
    the steps that launched a decode before reading the previous one while requests waited."""
    shapes, decode = {}, engine._decode

    def recorded(seqs, feed=None):
        for seq in seqs:
            shapes[(seq.request_id, seq.num_cached)] = engine._decode_rows(len(seqs))
        return decode(seqs, feed)

    engine._decode = recorded
    outs, k, engine.overlapped_with_queue = {}, 0, 0
    while k <= max(arrivals, default=0) or engine.has_work():
        for rid, prompt, params in arrivals.get(k, []):
            engine.add_request(prompt, params, request_id=rid)
        for rid in (abort_at or {}).get(k, []):
            assert engine.abort(rid)
        waiting, overlapped = engine.num_waiting, engine.stats["overlapped_steps"]
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(
                (o.new_token_ids, o.finished, o.finish_reason, o.error, o.prompt_tokens, o.completion_tokens))
        engine.overlapped_with_queue += bool(waiting and engine.stats["overlapped_steps"] > overlapped)
        k += 1
    assert engine.allocator.num_free == engine.allocator.capacity
    assert engine._pending is None  # no step left unresolved once the engine is idle
    return outs, shapes


def overlap_and_reference(model, config: EngineConfig, arrivals: dict, eos=(), abort_at=None):
    """The same requests through the synchronous engine at the same decode shapes and through the
    overlapped one: every request's outputs are equal, and every kept token was computed at the decode
    shape the synchronous engine used (extra keys: discarded rows). -> the overlapped engine."""
    sync = Engine(model, dataclasses.replace(config, static_decode_shapes=True, overlap_decode=False), eos)
    over = Engine(model, dataclasses.replace(config, overlap_decode=True), eos)
    (want, want_shapes), (got, got_shapes) = run_engine(sync, arrivals, abort_at), run_engine(over, arrivals, abort_at)
    aborted = {rid for rids in (abort_at or {}).values() for rid in rids}
    assert {r: o for r, o in got.items() if r not in aborted} == {r: o for r, o in want.items() if r not in aborted}
    for rid in aborted:  # a pending step's token is dropped when its request is aborted
        assert got.get(rid, []) == want.get(rid, [])[:len(got.get(rid, []))]
    assert {key: got_shapes[key] for key in want_shapes} == want_shapes
    if not aborted:  # (an aborted request's pending row is discarded too, and its token not counted)
        assert len(got_shapes) - len(want_shapes) == over.stats["discarded_rows"]
        assert over.stats["decode_tokens"] == sync.stats["decode_tokens"]
    assert sync.stats["overlapped_steps"] == 0
    assert (over.stats["prefill_tokens"], over.stats["preemptions"]) == (sync.stats["prefill_tokens"],
                                                                         sync.stats["preemptions"])
    return over


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_overlapped_decode_matches_the_synchronous_engine(tiny_config, kv_format):
    """Stop tokens, EOS (and ignore_eos), max_tokens, a request arriving mid-run and a sampled one:
    the overlapped engine's outputs equal the synchronous engine's, through its paths: rows of stopped
    sequences discarded and the synchronous fallback (arrivals, sampling); the redo path has its own test."""
    model = random_model(tiny_config, kv_format)
    over = overlap_scenario(model, EngineConfig(max_batch=4, page_size=4, max_context=64, graph_buckets=(1, 2, 4)))
    assert over.stats["overlapped_steps"] > 0 and over.stats["discarded_rows"] > 0


def test_overlapped_decode_redoes_a_step_whose_bucket_changes(tiny_config):
    """Three rows (bucket 4) of which one stops at the pending step: the synchronous engine decodes the
    next step with two rows (bucket 2), so the step launched with three is rolled back and redone."""
    model = random_model(tiny_config)
    ps = prompts(tiny_config.vocab_size, (5, 7, 9))
    config = EngineConfig(max_batch=4, page_size=4, max_context=64, graph_buckets=(1, 2, 4))
    free = Engine(model, config).generate(ps, SamplingParams(max_tokens=10, ignore_eos=True))
    params = [SamplingParams(max_tokens=10, stop_token_ids=(free[0].token_ids[3],))] + \
        [SamplingParams(max_tokens=10, ignore_eos=True)] * 2
    reqs = {0: [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(ps, params))]}
    over = overlap_and_reference(model, config, reqs)
    assert over.stats["redone_steps"] == 1 and over.stats["discarded_rows"] == 1
    # the redo runs in the same step() call, so a request arriving after it joins at the same step as in
    # the synchronous engine (were it redone in the next call, the others' last tokens would be decoded
    # with the late request's first ones, in another bucket)
    late = (ps[0], SamplingParams(max_tokens=6, ignore_eos=True))
    for k in (6, 9):
        over = overlap_and_reference(model, config, {**reqs, k: [("late", *late)]})
        assert over.stats["redone_steps"] == 1


def queue_requests(model, config: EngineConfig, n: int, max_tokens: int = 12):
    """n requests whose stop tokens, EOS, max_tokens and ignore_eos (picked from a free run) end them
    at various steps; -> (requests, eos)."""
    ps = prompts(model.config.vocab_size, (5, 11, 3, 8, 6, 9, 4, 7, 10)[:n], seed=2)
    free = [c.token_ids for c in Engine(model, config).generate(ps, SamplingParams(max_tokens=max_tokens,
                                                                                   ignore_eos=True))]
    kinds = [lambda f: SamplingParams(max_tokens=max_tokens, stop_token_ids=(f[3],)),
             lambda f: SamplingParams(max_tokens=5),
             lambda f: SamplingParams(max_tokens=max_tokens, ignore_eos=True),
             lambda f: SamplingParams(max_tokens=max_tokens, stop_token_ids=(f[6], f[8])),
             lambda f: SamplingParams(max_tokens=max_tokens)]  # and EOS: free[1][2]
    reqs = [(f"r{i}", p, kinds[i % len(kinds)](f)) for i, (p, f) in enumerate(zip(ps, free))]
    return reqs, [free[1][2]]


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_overlapped_decode_with_a_full_batch_and_a_queue(tiny_config, kv_format):
    """More requests than batch slots (and some arriving mid-run), ended by stop tokens, EOS and
    max_tokens: decode steps overlap while requests wait, launched steps are redone (rows stopped and
    let a waiting request in, or left another bucket), everything equals the synchronous engine
    (overlap_and_reference)."""
    model = random_model(tiny_config, kv_format)
    config = EngineConfig(max_batch=3, page_size=4, max_context=64, graph_buckets=(1, 2, 4))
    reqs, eos = queue_requests(model, config, 9)
    over = overlap_and_reference(model, config, {0: reqs[:6], 5: reqs[6:8], 11: reqs[8:]}, eos=eos)
    assert over.overlapped_with_queue > 0 and over.stats["redone_steps"] > 0
    assert over.stats["preemptions"] == 0


def test_overlapped_decode_when_a_stop_admits_a_waiting_request(tiny_config):
    """Two slots, three requests: r0 stops at the pending step while r2 waits, so the synchronous
    engine's next step admits (and prefills) r2: the step launched behind it is redone in the same call.
    Before that, the steps overlap although r2 waits."""
    model = random_model(tiny_config)
    ps = prompts(tiny_config.vocab_size, (5, 7, 9))
    config = EngineConfig(max_batch=2, page_size=4, max_context=64, graph_buckets=(1, 2))
    free = Engine(model, config).generate(ps, SamplingParams(max_tokens=10, ignore_eos=True))
    stop = free[0].token_ids[5]
    params = [SamplingParams(max_tokens=10, stop_token_ids=(stop,))] + \
        [SamplingParams(max_tokens=10, ignore_eos=True)] * 2
    over = overlap_and_reference(model, config, {0: [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(ps, params))]})
    assert over.overlapped_with_queue >= free[0].token_ids.index(stop) - 1
    assert over.stats["redone_steps"] == 1 and over.stats["discarded_rows"] == 1


def test_overlapped_decode_admits_into_exactly_the_pages_of_the_synchronous_engine(tiny_config):
    """Two slots, 7 pages: r2 (12 tokens: 4 pages to be admitted, 3 to prefill) waits until r0 stops;
    then the synchronous engine admits it into the 4 pages free before r1 grows a page for its next
    token, and prefills it into the 3 left. The overlapped engine has already given r1 that page for the
    step it launched: it must count it as free when it decides that r2 gets in, and give it back when
    it throws that step away (one bucket, so only the admission makes it redo the step)."""
    model = random_model(tiny_config)
    ps = prompts(tiny_config.vocab_size, (5, 8, 12), seed=1)
    config = EngineConfig(max_batch=2, page_size=4, max_context=24, num_pages=8, graph_buckets=(2,))
    free = Engine(model, config).generate(ps[:1], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    # r0 stops at a token index j where r1 (8 prompt tokens) starts a page at the next step
    j = next(i for i, t in enumerate(free) if i > 0 and free.index(t) == i and (8 + i) % 4 == 0)
    params = [SamplingParams(max_tokens=12, stop_token_ids=(free[j],)), SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=6, ignore_eos=True)]
    over = overlap_and_reference(model, config, {0: [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(ps, params))]})
    assert over.overlapped_with_queue > 0 and over.stats["redone_steps"] == 1


def test_overlapped_decode_with_a_small_kv_pool_and_a_queue(tiny_config):
    """A KV pool that holds fewer sequences than the batch (requests wait for pages, the youngest is
    preempted), requests arriving mid-run, aborts of running and waiting ones: the same outputs and
    decode shapes as the synchronous engine, overlapping while requests wait."""
    model = random_model(tiny_config)
    config = EngineConfig(max_batch=4, page_size=4, max_context=32, num_pages=13, graph_buckets=(1, 2, 4))
    reqs, eos = queue_requests(model, config, 7, max_tokens=20)
    reqs = [(rid, p, sp if i in (0, 3) else SamplingParams(max_tokens=20 - i, ignore_eos=True))  # longer ones
            for i, (rid, p, sp) in enumerate(reqs)]
    arrivals = {0: reqs[:5], 8: reqs[5:6], 20: reqs[6:]}
    over = overlap_and_reference(model, config, arrivals, eos=eos)
    assert over.overlapped_with_queue > 0 and over.stats["preemptions"] > 0
    # aborts: r5 while it waits, r2 (pending) while r4 (preempted) and r5 wait, r6 (pending) late
    over = overlap_and_reference(model, config, arrivals, eos=eos, abort_at={14: ["r5"], 16: ["r2"], 24: ["r6"]})
    assert over.overlapped_with_queue > 0 and over.stats["preemptions"] > 0


def overlap_scenario(model, config: EngineConfig):
    """overlap_and_reference with stop tokens, EOS, max_tokens, ignore_eos (picked from a free run so
    that they stop at various steps), a request arriving mid-run and a sampled one."""
    ps = prompts(model.config.vocab_size, (5, 11, 3, 8, 6, 9))
    free = [c.token_ids for c in Engine(model, config).generate(ps, SamplingParams(max_tokens=14, ignore_eos=True))]
    params = [SamplingParams(max_tokens=14, stop_token_ids=(free[0][3],)),
              SamplingParams(max_tokens=14, stop_token_ids=(free[1][6], free[1][9])),
              SamplingParams(max_tokens=5),
              SamplingParams(max_tokens=14),  # stops at EOS
              SamplingParams(max_tokens=10, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.8, seed=3)]
    reqs = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(ps, params))]
    return overlap_and_reference(model, config, {0: reqs[:4], 9: reqs[4:5], 14: reqs[5:]}, eos=[free[3][4]])


def test_overlapped_decode_when_every_row_stops(tiny_config):
    """The only sequence stops at the pending step: the step launched behind it is dropped (not left
    pending with nothing to resolve it), same outputs as the synchronous engine."""
    model = random_model(tiny_config)
    p = prompts(tiny_config.vocab_size, (5,))[0]
    free = Engine(model, EngineConfig(page_size=4, max_context=64)).generate([p], SamplingParams(max_tokens=10))
    params = SamplingParams(max_tokens=10, stop_token_ids=(free[0].token_ids[4],))
    over = overlap_and_reference(model, EngineConfig(page_size=4, max_context=64), {0: [("r0", p, params)]})
    assert over.stats["overlapped_steps"] > 0 and over.stats["discarded_rows"] == 1


def test_overlapped_decode_under_page_exhaustion_and_aborts(tiny_config):
    """Preemption (a pool of about one and a half sequences) and aborts of sequences with a pending
    step: the same outputs as the synchronous engine, every page back."""
    model = random_model(tiny_config)
    ps = prompts(tiny_config.vocab_size, (6, 9, 4, 12))
    reqs = [(f"r{i}", p, SamplingParams(max_tokens=20)) for i, p in enumerate(ps)]
    over = overlap_and_reference(model, EngineConfig(max_batch=4, page_size=4, max_context=32, num_pages=13),
                                 {0: reqs})
    assert over.stats["preemptions"] > 0 and over.stats["overlapped_steps"] > 0
    config = EngineConfig(max_batch=4, page_size=4, max_context=64, graph_buckets=(1, 2, 4))
    over = overlap_and_reference(model, config, {0: reqs}, abort_at={6: ["r1"], 8: ["r0", "r3"]})
    assert over.stats["discarded_rows"] >= 3


def test_overlapped_decode_step_failure_fails_its_requests(tiny_config, monkeypatch):
    """A decode that raises while a step is pending fails the requests of both steps; the engine goes on."""
    model = random_model(tiny_config)
    engine = Engine(model, EngineConfig(page_size=4, max_context=64, max_batch=4, overlap_decode=True))
    ps = prompts(tiny_config.vocab_size, (5, 7))
    for p in ps:
        engine.add_request(p, SamplingParams(max_tokens=10))
    outs = engine.step() + engine.step() + engine.step()  # prefill, then a pending decode step
    assert engine._pending is not None and all(not o.finished for o in outs)
    monkeypatch.setattr(engine.runner, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = engine.step()
    assert sorted(o.request_id for o in failed) == ["req-0", "req-1"]
    assert all(o.finish_reason == "error" and "boom" in o.error for o in failed)
    assert not engine.has_work() and engine._pending is None
    assert engine.allocator.num_free == engine.allocator.capacity
    monkeypatch.undo()
    alone = Engine(model, EngineConfig(page_size=4, max_context=64)).generate(ps[:1], SamplingParams(max_tokens=6))
    assert engine.generate(ps[:1], SamplingParams(max_tokens=6))[0].token_ids == alone[0].token_ids


# ------------------------------------------------------------------------ atom / fp8 modes

PIPELINE_CONFIG = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def atom_checkpoint(tmp_path_factory):
    """A tiny model quantized with the Atom recipe (W4A4 + outliers + KV4) and saved."""
    from models.checkpoint import save_checkpoint
    from models.quantize import quantize_model
    from models.recipe import ATOM
    from test_pipeline import byte_tokenizer

    model = random_model(PIPELINE_CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1 / 6)  # std 0.05, as the pipeline tests use
    report = quantize_model(model, torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)),
                            ATOM, progress=False)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "atom", model, byte_tokenizer(), report)


def test_atom_checkpoint_runs_on_kv4_pages_and_batches_exactly(atom_checkpoint):
    from models.engine.modes import load_for_mode

    model, tok, mode, _ = load_for_mode("auto", str(atom_checkpoint), "cpu")
    assert mode == "atom"
    config = EngineConfig(max_batch=4, page_size=8, max_context=64)
    engine = Engine(model, config, eos_token_ids=[tok.eos_id])
    assert engine.kv_format == "kv4"
    ps, params = prompts(256, (7, 12, 4)), SamplingParams(max_tokens=6, ignore_eos=True)
    assert [c.token_ids for c in engine.generate(ps, params)] == one_at_a_time(model, config, ps, params)
    with pytest.raises(ValueError, match="atom mode"):
        load_for_mode("fp16", str(atom_checkpoint), "cpu")


def test_fused_atom_layers_match_the_layers_they_regroup(atom_checkpoint):
    """The serving layers (q|k|v and gate|up regrouped, RMSNorm / SiLU-mul in the quantization op,
    residuals in the GEMM) compute each decoder layer up to fp16 rounding, and the engine serves with them.
    Layer by layer on the same input: a W4A4 model turns a last-bit change of a layer's input into a
    few flipped quantization steps, which the next layers amplify (this tiny model: 0.9% in -> 11% out
    of the next layer for the reference layers themselves), so whole-model outputs are not comparable."""
    from models.engine.fused_layers import fuse_atom_layers
    from models.engine.modes import _to_half, load_for_mode

    model, _, _, _ = load_for_mode("atom", str(atom_checkpoint), "cpu")
    assert fuse_atom_layers(model) is None  # fp32 model: its residual stream is not the GEMM's dtype
    model = _to_half(model, "cpu")
    fused = fuse_atom_layers(model)
    assert fused is not None and fused.layers[0].qkv.out_features == 192 + 2 * 96
    m = model.model
    ids, positions = torch.tensor([prompts(256, (12,))[0]]), torch.arange(12)[None]
    with torch.no_grad():
        x = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(positions, x.dtype)
        for layer, fused_layer in zip(m.layers, fused.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            unfused_qkv = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)[0]
            assert torch.equal(fused_layer.qkv(x[0], "rmsnorm", layer.input_layernorm.weight,
                                               layer.input_layernorm.eps), unfused_qkv)
            # gate_up's rows come in down_proj's channel order: the SiLU quantization applies no
            # permutation and the MLP's output is unchanged, bit for bit
            mlp, h2 = layer.mlp, layer.post_attention_layernorm(x)[0]
            assert not torch.equal(mlp.down_proj.perm, torch.arange(mlp.down_proj.in_features))  # a real reorder
            assert torch.equal(fused_layer.down_proj(fused_layer.gate_up(h2), "silu_mul", input_permuted=True),
                               mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h2)) * mlp.up_proj(h2)))
            ref, got = layer(x, cos, sin).float(), fused_layer(x, cos, sin).float()
            # Chaotic, not systematic: layer 2 measured 2.7% max / 1.3% rms with the reference's
            # multiply-then-add promotion, 4.7% / 2.1% with its single-rounding FMA (same layers,
            # same input); a regrouping or permutation error is of order 100%.
            assert (got - ref).abs().max() <= 8e-2 * ref.abs().max()
            assert (got - ref).pow(2).mean().sqrt() <= 4e-2 * ref.pow(2).mean().sqrt()
            x = layer(x, cos, sin)
    engine = Engine(model, EngineConfig(page_size=8, max_context=64, max_batch=4))
    assert engine.fused is not None and engine.runner.body is engine.fused
    done = engine.generate(prompts(256, (7, 12)), SamplingParams(max_tokens=5, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [5, 5]


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_served_perplexity_is_the_plain_models_on_the_cpu(tiny_config, kv_format):
    """Scoring windows through the engine (one packed prefill each over freshly allocated pages,
    K and V stored then read back: KV4 pages for kv4) gives the plain forward's perplexity, which
    applies the same KV4 quantizer; the pages go back to the pool and bad windows fail clearly."""
    from models.engine.scoring import served_nll, served_perplexity
    from models.eval import perplexity

    model = random_model(tiny_config, kv_format)
    engine = Engine(model, EngineConfig(page_size=4, max_context=32, max_batch=2))
    windows = torch.randint(0, tiny_config.vocab_size, (3, 23), generator=torch.Generator().manual_seed(5))
    free = engine.allocator.num_free
    served, plain = served_perplexity(engine, windows, progress=False), perplexity(model, windows, progress=False)
    assert abs(served - plain) <= 1e-4 * plain, (served, plain)
    assert engine.allocator.num_free == free
    with pytest.raises(ValueError, match="2..32 tokens"):
        served_nll(engine, torch.zeros(33, dtype=torch.long))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        served_nll(engine, windows[0])


def test_merged_projections_match_the_layers_they_stack(tiny_config):
    """fp16 / fp8 models serve with q|k|v and gate|up each one linear: same layer outputs (up to the
    GEMM's summation order), the originals turned into views of the stacked weights (nothing held
    twice, the model itself unchanged), and the engine serving through them unless told not to."""
    from models.engine.fp8 import Fp8Linear
    from models.engine.fused_layers import MergedProjectionLayer, merge_projections, stack_linears

    model = random_model(tiny_config)
    ids, positions = torch.tensor([prompts(tiny_config.vocab_size, (9,))[0]]), torch.arange(9)[None]
    with torch.no_grad():
        before = model(ids)
        merged = merge_projections(model)
        assert merged is not None and all(isinstance(m, MergedProjectionLayer) for m in merged.layers)
        first, attn = merged.layers[0], model.model.layers[0].self_attn
        assert first.qkv.out_features == attn.q_proj.out_features + 2 * attn.k_proj.out_features
        shared = first.qkv.weight.untyped_storage().data_ptr()
        assert all(p.weight.untyped_storage().data_ptr() == shared for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        assert torch.allclose(model(ids), before, atol=1e-5, rtol=0)  # the model computes as before
        x = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(positions, x.dtype)
        for layer, merged_layer in zip(model.model.layers, merged.layers):
            assert torch.allclose(merged_layer(x, cos, sin), layer(x, cos, sin), atol=1e-5, rtol=1e-5)
            x = layer(x, cos, sin)
    engine = Engine(model, EngineConfig(page_size=4, max_context=64, max_batch=2))
    assert engine.runner.body is engine.fused and isinstance(engine.fused.layers[0], MergedProjectionLayer)
    again = Engine(model, EngineConfig(page_size=4, max_context=64, max_batch=2))  # views, not a second copy
    assert again.fused.layers[0].qkv.weight.data_ptr() == engine.fused.layers[0].qkv.weight.data_ptr()
    assert attn.q_proj.weight.data_ptr() == engine.fused.layers[0].qkv.weight.data_ptr()
    assert Engine(model, EngineConfig(page_size=4, max_context=64, max_batch=2, regroup_layers=False)).fused is None
    # fp8 projections stack their e4m3 rows and per-channel scales (forward: GPU test)
    lins = [Fp8Linear(torch.nn.Linear(32, n, bias=False)) for n in (16, 48)]
    want = [(m.weight_fp8.clone(), m.weight_scale.clone()) for m in lins]
    stacked = stack_linears(lins)
    assert isinstance(stacked, Fp8Linear) and stacked.out_features == 64
    assert torch.equal(stacked.weight_fp8.view(torch.uint8), torch.cat([w.view(torch.uint8) for w, _ in want]))
    assert torch.equal(stacked.weight_scale, torch.cat([s for _, s in want], dim=1))
    assert all(torch.equal(m.weight_fp8.view(torch.uint8), w.view(torch.uint8)) and torch.equal(m.weight_scale, s)
               for m, (w, s) in zip(lins, want))
    biased = random_model(dataclasses.replace(tiny_config, attention_bias=True))
    biased.model.layers[0].self_attn.k_proj.bias = None  # q and v with a bias, k without: not stackable
    assert merge_projections(biased) is None


def test_fp8_mode_refuses_the_cpu(tiny_config):
    from models.engine.fp8 import convert_to_fp8
    from models.engine.modes import load_for_mode

    with pytest.raises(ValueError, match="fp8 mode needs a CUDA GPU"):
        load_for_mode("fp8", None, "cpu")
    with pytest.raises(ValueError, match="fp8 mode needs a CUDA GPU"):
        convert_to_fp8(random_model(tiny_config))


def test_fp8_linear_is_the_per_channel_per_token_e4m3_product():
    """The arithmetic of the fp8 mode, where this torch can run _scaled_mm on the CPU: the product
    of the dequantized e4m3 operands, up to the bf16 output rounding."""
    from models.engine.fp8 import Fp8Linear, quantize_fp8_rows

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    fp8 = Fp8Linear(lin)
    try:  # whether this torch build has a CPU _scaled_mm at all (row-wise scales, bf16 out)
        a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {e}")
    with torch.no_grad():
        got = fp8(x)  # Fp8Linear's own CPU path must then run (no CUDA call in it)
    xq, sx = quantize_fp8_rows(x.reshape(-1, 64))
    ref = (xq.float() * sx) @ (fp8.weight_fp8.float() * fp8.weight_scale.T).T + lin.bias
    assert torch.allclose(got.reshape(-1, 32), ref.detach(), rtol=1e-2, atol=1e-2)
    assert (got - lin(x)).abs().max() < 0.1 * lin(x).abs().max()  # and close to the float layer


def test_baseline_mlp_tail_is_down_of_silu_gate_times_up():
    """silu_mul_down (the fp16 / fp8 layers' MLP tail) computes down(silu(gate) * up) from the merged
    gate_up output: on the CPU through torch's ops for nn.Linear, and for an Fp8Linear (where this torch
    has a CPU _scaled_mm) the quantization of silu(gate) * up, not of gate_up."""
    from models.engine.fp8 import Fp8Linear
    from models.engine.fused_layers import silu_mul_down

    torch.manual_seed(0)
    down = torch.nn.Linear(32, 16, bias=False)
    gate_up = torch.randn(2, 3, 64)
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.no_grad():
        assert torch.equal(silu_mul_down(down, gate_up), down(torch.nn.functional.silu(gate) * up))
        fp8 = Fp8Linear(down)
        try:
            want = fp8(torch.nn.functional.silu(gate) * up)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._scaled_mm does not run on this CPU build: {e}")
        assert torch.equal(silu_mul_down(fp8, gate_up), want)
        assert not torch.equal(fp8(gate_up[..., :32]), want)  # the test tells the inputs apart


# ---------------------------------------------------------------------------- text helpers

class _CharTokenizer:
    """ids are byte values; decode shows an incomplete UTF-8 tail as U+FFFD like HF does."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    stream = TextStream(_CharTokenizer(), stop=["END"])
    pieces = [stream.add(list(chunk)) for chunk in (b"ab", "é".encode()[:1], "é".encode()[1:] + b"E", b"N", b"Dxx")]
    assert pieces == ["ab", "", "é", "", ""] and stream.stopped and stream.flush() == ""
    plain = TextStream(_CharTokenizer(), stop=["END"])
    assert plain.add(list(b"hi E")) == "hi " and plain.flush() == "E"
    assert render_chat([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}])


# ------------------------------------------------------------------------------------- GPU

def test_collector_held_off_restores_the_collector():
    """Automatic collection is off inside (the CUDA-graph capture), back on after, also when the block
    raises; a collector the caller had turned off stays off."""
    assert gc.isenabled()
    with collector_held_off():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="capture failed"):
        with collector_held_off():
            raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_held_off():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to_cuda_half(model):
    model = model.half().cuda()
    model.model.rotary_emb.reset_buffers("cuda")
    return model


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_gpu_fp16_batching_and_cuda_graphs(tiny_config, kv_format):
    model = _to_cuda_half(random_model(tiny_config, kv_format))
    config = EngineConfig(max_batch=4, page_size=16, max_context=128, graph_buckets=(1, 2, 4))
    ps, params = prompts(tiny_config.vocab_size), SamplingParams(max_tokens=12)
    expected = one_at_a_time(model, config, ps, params)
    eager = [c.token_ids for c in Engine(model, config).generate(ps, params)]
    padded = [c.token_ids for c in Engine(model, dataclasses.replace(config, static_decode_shapes=True)).generate(ps, params)]
    graphed = [c.token_ids for c in Engine(model, dataclasses.replace(config, cuda_graphs=True)).generate(ps, params)]
    # fp16 GEMMs of other batch sizes may round differently: compare the first tokens only;
    # a replayed graph runs the same kernels on the same shapes as the padded eager step
    for e, a, b, c in zip(expected, eager, padded, graphed):
        assert e[:4] == a[:4] == b[:4] and b == c


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_gpu_overlapped_graph_decode_matches_the_synchronous_graphs(tiny_config, kv_format):
    """CUDA-graph decode one step late (input ids gathered on the device from the previous step's argmax,
    tokens read back through pinned memory after the next step is queued): exactly the synchronous graph
    engine's outputs, each kept token computed at the same graph bucket (overlap_and_reference)."""
    model = _to_cuda_half(random_model(tiny_config, kv_format))
    config = EngineConfig(max_batch=4, page_size=16, max_context=128, graph_buckets=(1, 2, 4), cuda_graphs=True)
    over = overlap_scenario(model, config)
    assert over.stats["overlapped_steps"] > 0 and over.stats["discarded_rows"] > 0
    assert Engine(model, config).overlap  # on by default with graphs


@pytest.mark.gpu
@gpu
def test_gpu_graph_capture_runs_with_the_collector_off(tiny_config, monkeypatch):
    """A collection mid-capture that frees a dead engine's graphs invalidates the capture (seen:
    cudaErrorStreamCaptureInvalidated after `reset` warnings): every warm-up and captured forward of
    DecodeGraphs.capture runs with automatic collection off, and it is back on after."""
    from models.engine.runner import ModelRunner

    model = _to_cuda_half(random_model(tiny_config))
    collector_on, forward = [], ModelRunner.forward

    def recording_forward(self, *args):
        collector_on.append(gc.isenabled())
        return forward(self, *args)

    monkeypatch.setattr(ModelRunner, "forward", recording_forward)
    Engine(model, EngineConfig(max_batch=4, max_context=64, cuda_graphs=True, graph_buckets=(1, 2, 4)))
    assert collector_on == [False] * 9 and gc.isenabled()  # 3 buckets x (2 warm-ups + the capture)


@pytest.mark.gpu
@gpu
def test_gpu_fp8_mode_close_to_fp16(tiny_config):
    from models.engine.fp8 import Fp8Linear, convert_to_fp8

    model = _to_cuda_half(random_model(tiny_config))
    ids = torch.tensor([prompts(tiny_config.vocab_size)[1]], device="cuda")
    with torch.no_grad():
        ref = model(ids)
        convert_to_fp8(model)
        assert isinstance(model.model.layers[0].mlp.down_proj, Fp8Linear)
        got = model(ids)
    cosine = torch.nn.functional.cosine_similarity(got.flatten().float(), ref.flatten().float(), dim=0)
    assert cosine > 0.95, cosine  # e4m3 rounds each operand by up to 6%: close, not equal
    engine = Engine(model, EngineConfig(max_batch=4, max_context=128, cuda_graphs=True, graph_buckets=(1, 2, 4)))
    done = engine.generate(prompts(tiny_config.vocab_size), SamplingParams(max_tokens=8))
    assert all(len(c.token_ids) == 8 for c in done)


@pytest.mark.gpu
@gpu
def test_gpu_merged_layers_with_the_fused_norm_track_the_model(tiny_config):
    """On a GPU the baseline modes' merged layers run torch's fused RMSNorm (one rounding where the
    model's HF-order norm has two) and fp8 writes the model dtype from the GEMM where torch allows:
    each layer stays within fp16 rounding of the model's own layer, and fp8 outputs are fp16."""
    from models.engine.fp8 import Fp8Linear, rowwise_out_ok
    from models.engine.fused_layers import merge_projections

    model = _to_cuda_half(random_model(tiny_config))
    ids = torch.tensor([prompts(tiny_config.vocab_size)[1]], device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda")[None]
    with torch.no_grad():
        merged = merge_projections(model)
        x = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(positions, x.dtype)
        for layer, merged_layer in zip(model.model.layers, merged.layers):
            want, got = layer(x, cos, sin), merged_layer(x, cos, sin)
            assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max(), "merged layer drifted"
            x = want
        lin = Fp8Linear(torch.nn.Linear(64, 32, bias=False).cuda().half())
        y = lin(torch.randn(5, 64, device="cuda", dtype=torch.float16))
    assert y.dtype == torch.float16 and isinstance(rowwise_out_ok(torch.float16, y.device), bool)


@pytest.mark.gpu
@gpu
def test_gpu_fp8_quantize_kernel_is_the_reference_bit_for_bit():
    """The FP8 baseline's fused per-row quantization against its torch ops: same e4m3 bytes, same
    scales, over dtypes, odd and long rows, a zero row, strided rows and large values."""
    from atom_ops import kernels
    from models.engine.fp8 import quantize_fp8_rows, quantize_fp8_rows_reference

    if not hasattr(kernels.extension(), "fp8_quantize_rows"):
        pytest.skip("extension not built (or built before fp8_quantize_rows)")
    g = torch.Generator(device="cpu").manual_seed(0)
    checked = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, k, scale in ((1, 4096, 1.0), (64, 4096, 3.0), (7, 11008, 0.01), (33, 100, 1e3), (5, 1, 1.0),
                            (130, 14336, 20.0)):
            x = (torch.randn(m, k + 8, generator=g) * scale).to("cuda", dtype)[:, :k]  # strided rows
            x[m // 2] = 0  # an all-zero row: the 1e-12 floor
            got, want = kernels.fp8_quantize_rows(x), quantize_fp8_rows_reference(x)
            assert got is not None
            assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), (dtype, m, k)
            assert torch.equal(got[1], want[1]), (dtype, m, k)
            checked += 1
    assert checked == 18
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    x[1, 3], x[2, 5] = float("nan"), float("inf")  # NaN propagates as in torch (amax, clamp); inf / inf too
    got, want = kernels.fp8_quantize_rows(x), quantize_fp8_rows_reference(x)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)
    assert got[0][1].float().isnan().all() and got[0][2].float().isnan().sum() == 1
    assert torch.equal(quantize_fp8_rows(x)[0].view(torch.uint8), quantize_fp8_rows_reference(x)[0].view(torch.uint8))


@pytest.mark.gpu
@gpu
def test_gpu_baseline_silu_mul_kernels_are_the_reference_bit_for_bit():
    """The baselines' fused MLP activation: kernels.silu_mul against torch's F.silu(gate) * up, and
    fp8_quantize_rows(silu_mul=True) against the reference quantization of that product, over dtypes,
    odd and long rows, strided rows, unaligned starts (the scalar path), a zero row, and rows at and past
    the staged kernel's shared-memory limit (past it: the recomputing kernel)."""
    from atom_ops import kernels
    from atom_ops.quant_ops import silu_mul_reference
    from models.engine.fp8 import quantize_fp8_rows_reference

    if not hasattr(kernels.extension(), "silu_mul"):
        pytest.skip("extension not built (or built before silu_mul)")
    g = torch.Generator(device="cpu").manual_seed(1)
    checked = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, k, scale, pad, start in ((1, 11008, 1.0, 0, 0), (64, 14336, 3.0, 8, 0), (7, 100, 0.01, 8, 0),
                                        (33, 4096, 20.0, 0, 1), (5, 1, 1.0, 3, 1), (300, 8, 1.0, 0, 0),
                                        (3, 12224, 1.0, 0, 0), (2, 24449, 1.0, 0, 0),  # staged-row limit (fp32), past it
                                        (4, 64, 1.0, 3, 0)):  # aligned start, row stride not a vector multiple
            x = (torch.randn(m, start + 2 * k + pad, generator=g) * scale).to("cuda", dtype)[:, start:start + 2 * k]
            x[m // 2] = 0
            want = silu_mul_reference(x)
            got = kernels.silu_mul(x)
            assert got is not None and got.dtype == dtype and got.shape == (m, k)
            assert torch.equal(got, want), (dtype, m, k, start)
            q, s = kernels.fp8_quantize_rows(x, silu_mul=True)
            q_ref, s_ref = quantize_fp8_rows_reference(want)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (dtype, m, k, start)
            assert torch.equal(s, s_ref), (dtype, m, k, start)
            checked += 1
    assert checked == 27
    assert kernels.silu_mul(torch.ones(2, 5, device="cuda", dtype=torch.float16)) is None  # odd width: torch's ops


@pytest.mark.gpu
@gpu
def test_gpu_atom_checkpoint_engine(atom_checkpoint):
    from models.engine.modes import load_for_mode

    model, tok, mode, _ = load_for_mode("atom", str(atom_checkpoint), "cuda")
    config = EngineConfig(max_batch=4, page_size=16, max_context=64, graph_buckets=(1, 2, 4))
    ps, params = prompts(256, (7, 12, 4)), SamplingParams(max_tokens=6, ignore_eos=True)
    expected = one_at_a_time(model, config, ps, params)
    for cfg in (config, dataclasses.replace(config, cuda_graphs=True)):
        engine = Engine(model, cfg)
        assert engine.kv_format == "kv4"
        got = [c.token_ids for c in engine.generate(ps, params)]
        assert [g[:3] for g in got] == [e[:3] for e in expected]
