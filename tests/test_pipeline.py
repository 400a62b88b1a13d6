"""The offline pipeline on a tiny random Llama: GPTQ, quantize_model, checkpoints, bad inputs."""

import copy
import json

import pytest
import torch

from atom_ops import formats
from atom_ops.formats import QuantSpec
from models import gptq
from models.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.quantize import quantize_model
from models.quantized_linear import AtomLinear, KV4Quantizer
from models.recipe import ATOM, Recipe


def tiny_model(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    m = LlamaForCausalLM(cfg)
    for p in m.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def byte_tokenizer():
    """A real HF tokenizers object (byte-level BPE with no merges) so checkpoints can save it."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    from models.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = HF(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, 1, 2)


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.exp(torch.randn(k, generator=g))  # a few channels much larger, like real activations
    return (torch.randn(n, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_gptq_beats_rtn_on_layer_output_error(order):
    k, n = 384, 96
    x = correlated_inputs(2048, k)
    w = torch.randn(n, k)
    h = x.T @ x
    spec = QuantSpec(k, 128, 128)
    perm = torch.argsort((x ** 2).sum(0))
    wr, hr = w[:, perm], h[perm][:, perm]
    rtn = gptq.rtn_quantize(wr, spec, 1.0)
    gq = gptq.gptq_quantize(wr, hr, spec, 1.0, order=order)
    gq.validate()
    e_rtn = gptq.weighted_error(wr, rtn.dequantize(), hr)
    e_gptq = gptq.weighted_error(wr, gq.dequantize(), hr)
    assert e_gptq < 0.7 * e_rtn


def test_gptq_from_the_outlier_end_helps_the_large_channels():
    """Walking the reordered layout from its large-activation end lets the remaining columns
    absorb the large channels' error (GPTQ's act-order idea); as stored, they come last."""
    k, n = 576, 128
    x = correlated_inputs(4096, k, seed=5) * torch.exp(torch.randn(k, generator=torch.Generator().manual_seed(6)))
    w = torch.randn(n, k)
    perm = torch.argsort((x ** 2).sum(0))
    wr, hr = w[:, perm], (x.T @ x)[perm][:, perm]
    for spec in (QuantSpec(k, 64, 0), QuantSpec(k, 128, 64)):
        asc = gptq.gptq_quantize(wr, hr, spec, 1.0, order="ascending")
        desc = gptq.gptq_quantize(wr, hr, spec, 1.0, order="descending")
        desc.validate()
        assert gptq.weighted_error(wr, desc.dequantize(), hr) < 0.9 * gptq.weighted_error(wr, asc.dequantize(), hr)


def test_clip_search_never_worse_than_no_clip():
    k, n = 256, 64
    x = correlated_inputs(1024, k, seed=1)
    w = torch.randn(n, k)
    h = x.T @ x
    spec = QuantSpec(k, 128, 0)
    c = gptq.search_clip(w, spec, h)
    assert gptq.weighted_error(w, gptq.rtn_quantize(w, spec, c).dequantize(), h) <= \
        gptq.weighted_error(w, gptq.rtn_quantize(w, spec, 1.0).dequantize(), h)


def test_atom_linear_matches_dequantized_float_product():
    torch.manual_seed(3)
    k, n = 576, 64
    spec = QuantSpec(k, 128, 64)
    perm = torch.randperm(k)
    w = torch.randn(n, k)
    qt = formats.quantize_operand(w[:, perm], spec, 0.85)
    lin = AtomLinear.from_quantized(qt, perm, act_clip=1.0)
    x = torch.randn(3, 5, k)
    y = lin(x)
    a = formats.quantize_activation(x, spec, perm, 1.0)
    ref = a.dequantize().double() @ qt.dequantize().double().T
    assert y.shape == (3, 5, n)
    assert torch.allclose(y.reshape(-1, n).double(), ref, rtol=2e-3, atol=2e-2)
    # the weight seen in the original channel order is the dequantized one
    assert torch.allclose(lin.dequantized_weight()[:, perm], qt.dequantize())


def test_quantize_model_replaces_linears_and_stays_close():
    m = tiny_model()
    ids = torch.randint(0, 256, (4, 64))
    with torch.no_grad():
        ref = m(ids)
    q = copy.deepcopy(m)
    report = quantize_model(q, ids, ATOM, progress=False)
    assert len(report.layers) == 2 * 7
    layer = q.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, AtomLinear) and isinstance(layer.mlp.down_proj, AtomLinear)
    assert isinstance(layer.self_attn.kv_quantizer, KV4Quantizer)
    # hidden 192 with g128: 64 outliers; intermediate 320 with g128: 64 outliers
    assert {(r.k, r.outliers) for r in report.layers} == {(192, 64), (320, 64)}
    # q, k and v share one permutation (one fused activation quantization in the kernels)
    assert torch.equal(layer.self_attn.q_proj.perm, layer.self_attn.v_proj.perm)
    with torch.no_grad():
        out = q(ids)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.3


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    m = tiny_model(tie=False)
    ids = torch.randint(0, 256, (2, 32))
    report = quantize_model(m, ids, ATOM, progress=False)
    ckpt = save_checkpoint(tmp_path / "ckpt", m, byte_tokenizer(), report)
    loaded, tok, meta = load_checkpoint(ckpt)
    assert meta["recipe"] == ATOM.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(ids), m(ids))
    assert tok.decode(tok.encode("hello world")) == "hello world"

    meta_file = ckpt / "atom_quant.json"
    good = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(good | {"format_version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        read_meta(ckpt)
    bad_layers = copy.deepcopy(good)
    name = next(iter(bad_layers["layers"]))
    bad_layers["layers"][name]["n"] += 16
    meta_file.write_text(json.dumps(bad_layers))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt)
    meta_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)
    meta_file.write_text(json.dumps(good))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError, match="atom_quant.json"):
        load_checkpoint(tmp_path / "nothing")


def test_recipe_rejects_bad_settings():
    with pytest.raises(ValueError, match="reorder"):
        Recipe(reorder=False)
    with pytest.raises(ValueError, match="group"):
        Recipe(group=96)
    assert Recipe(group=64).spec_for(576) == QuantSpec(576, 64, 128)
    assert Recipe().spec_for(576) == QuantSpec(576, 128, 64)
    assert Recipe().spec_for(1536) == QuantSpec(1536, 128, 128)
