"""The Atom offline pipeline: calibrate, reorder, clip, GPTQ, layer by layer (as GPTQ/Atom do).

Each decoder layer is handled in turn on the calibration inputs that the already quantized
layers before it produce: hooks collect, for every distinct linear input, the per-channel
sum of x^2 (the reorder key) and X^T X (GPTQ's Hessian); the layer's linears are then
replaced by AtomLinear (or FakeQuantLinear for the reference rows), and the layer is run
again to produce the next layer's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from atom_ops import formats
from atom_ops.formats import QuantizedTensor, QuantSpec

from . import gptq
from .quantized_linear import AtomLinear, FakeQuantLinear, KV4Quantizer
from .recipe import Recipe

# Linears that read the same input share one reorder permutation (they are fused in the kernels).
INPUT_GROUPS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}


@dataclass
class LayerReport:
    name: str
    k: int
    n: int
    group: int
    outliers: int
    weight_clip: float
    rel_error: float        # ||W - Q(W)||_H / ||W||_H on the calibration inputs

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class QuantizationReport:
    recipe: Recipe
    layers: list[LayerReport] = field(default_factory=list)


class _InputStats:
    """Running sum of x^2 per channel (the reorder key) and X^T X (GPTQ, clip search, error report)."""

    def __init__(self, k: int, device):
        self.sumsq = torch.zeros(k, dtype=torch.float64, device=device)
        self.hessian = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sumsq += (x.double() ** 2).sum(0)
        self.hessian += x.T @ x
        self.rows += x.shape[0]


def _capture_layer_inputs(model: nn.Module, calib_ids: torch.Tensor, batch: int):
    """Run the embedding and stop at layer 0, keeping each batch's (args, kwargs) for the layers."""
    first = model.model.layers[0]
    captured = []

    class _Stop(Exception):
        pass

    def hook(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib_ids.shape[0], batch):
            try:
                model(calib_ids[i: i + batch])
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, captured):
    """Apply one decoder layer to every captured batch; the hidden state is args[0]."""
    outs = []
    for args, kwargs in captured:
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outs.append(((hidden,) + tuple(args[1:]), kwargs))
    return outs


def _quantize_group(lins: list[nn.Linear], stats: _InputStats, perm: torch.Tensor | None,
                    recipe: Recipe) -> list[tuple[nn.Module, QuantSpec, float, float]]:
    """Quantize the linears that read one input, as one stacked weight.

    GPTQ treats output rows independently given the shared Hessian, so stacking q/k/v (or
    gate/up) gives exactly the per-linear result with one Cholesky and one column loop.
    The clip ratio (fixed or searched) is therefore shared by the stack.
    """
    w = torch.cat([lin.weight.detach().float() for lin in lins], dim=0)
    k = w.shape[1]
    spec = recipe.spec_for(k)
    w_r = w if perm is None else w[:, perm]
    h_r = stats.hessian if perm is None else stats.hessian[perm][:, perm]
    clip = gptq.search_clip(w_r, spec, h_r) if recipe.clip_search else recipe.weight_clip
    if recipe.w_bits == 8:  # W8A8 reference: per-channel INT8 weights, simulated
        wq, qt = formats.fake_quantize(w_r, 8, k, clip), None
    elif recipe.gptq:
        qt = gptq.gptq_quantize(w_r, h_r, spec, clip, recipe.gptq_block, recipe.gptq_damp, recipe.gptq_order)
        wq = qt.dequantize()
    else:
        qt = gptq.rtn_quantize(w_r, spec, clip)
        wq = qt.dequantize()
    results = []
    for lin, rows in _row_slices(lins):
        err = gptq.weighted_error(w_r[rows], wq[rows], h_r)
        ref = gptq.weighted_error(w_r[rows], torch.zeros_like(w_r[rows]), h_r)
        rel = (err / max(ref, 1e-30)) ** 0.5
        if recipe.a_bits == 4 and recipe.w_bits == 4:
            new = _atom_linear(qt, rows, perm, recipe.act_clip, lin)
        else:
            # simulated reference: weights back in the original channel order
            w_orig = wq[rows] if perm is None else wq[rows][:, torch.argsort(perm)]
            bias = lin.bias.detach() if lin.bias is not None else None
            new = FakeQuantLinear(w_orig.to(lin.weight.dtype), bias, recipe.a_bits, recipe.group,
                                  recipe.act_clip).to(lin.weight.device)
        results.append((new, spec, clip, rel))
    return results


def _row_slices(lins: list[nn.Linear]):
    """(linear, its rows in the stacked weight) for linears stacked along the output dim."""
    row = 0
    for lin in lins:
        yield lin, slice(row, row + lin.out_features)
        row += lin.out_features


def _atom_linear(qt: QuantizedTensor, rows: slice, perm: torch.Tensor | None, act_clip: float,
                 lin: nn.Linear) -> AtomLinear:
    """The AtomLinear replacing ``lin`` from its rows of a stacked quantized weight."""
    part = QuantizedTensor(qt.packed[rows], qt.outlier[rows], qt.scale[rows], qt.spec)
    bias = lin.bias.detach() if lin.bias is not None else None
    return AtomLinear.from_quantized(part, perm, act_clip, bias).to(lin.weight.device)


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, leaf, value)


@torch.no_grad()
def quantize_model(model: nn.Module, calib_ids: torch.Tensor, recipe: Recipe, batch: int = 1,
                   progress: bool = True) -> QuantizationReport:
    """Quantize ``model`` in place with ``recipe`` on calibration token windows [n, seqlen]."""
    if calib_ids.dim() != 2:
        raise ValueError(f"calibration ids must be [samples, seqlen], got {tuple(calib_ids.shape)}")
    report = QuantizationReport(recipe)
    device = next(model.parameters()).device
    calib_ids = calib_ids.to(device)
    captured = _capture_layer_inputs(model, calib_ids, batch)
    layers = model.model.layers
    for li, layer in enumerate(tqdm(layers, desc="quantize layers", disable=not progress)):
        stats: dict[str, _InputStats] = {}
        handles = []
        for key, names in INPUT_GROUPS.items():
            lin = _get(layer, names[0])
            stats[key] = _InputStats(lin.in_features, device)
            handles.append(lin.register_forward_pre_hook(lambda _m, args, s=stats[key]: s.add(args[0])))
        try:
            _run_layer(layer, captured)
        finally:
            for h in handles:
                h.remove()
        for key, names in INPUT_GROUPS.items():
            st = stats[key]
            # ascending order: the largest-magnitude channels end up last, as outliers
            perm = torch.argsort(st.sumsq).to(torch.int64) if recipe.reorder else None
            lins = [_get(layer, name) for name in names]
            for name, lin, (new, spec, clip, rel) in zip(names, lins, _quantize_group(lins, st, perm, recipe)):
                _set(layer, name, new)
                report.layers.append(LayerReport(f"model.layers.{li}.{name}", spec.k, lin.out_features,
                                                 spec.group, spec.outliers, clip, rel))
        if recipe.kv_bits == 4:
            layer.self_attn.kv_quantizer = KV4Quantizer(recipe.kv_group)
        captured = _run_layer(layer, captured)
    return report


@torch.no_grad()
def quantize_model_uncalibrated(model: nn.Module, recipe: Recipe, seed: int = 0, progress: bool = True) -> nn.Module:
    """Atom's format without calibration, for speed benchmarks on random weights (bench/e2e.py):
    a seeded random channel permutation per input group (shared by q/k/v and gate/up, as in
    the real pipeline), round-to-nearest weights with the recipe's clip, KV4 when the recipe
    asks. Same kernels, shapes and bytes as a calibrated checkpoint; not an accuracy recipe."""
    if not recipe.kernel_compatible:
        raise ValueError("quantize_model_uncalibrated needs a W4A4 recipe with group 64 or 128")
    gen = torch.Generator().manual_seed(seed)
    for layer in tqdm(model.model.layers, desc="quantize layers (RTN, random order)", disable=not progress):
        for names in INPUT_GROUPS.values():
            lins = [_get(layer, name) for name in names]
            k = lins[0].in_features
            spec = recipe.spec_for(k)
            perm = torch.randperm(k, generator=gen).to(lins[0].weight.device)
            w = torch.cat([lin.weight.detach().float() for lin in lins], dim=0)[:, perm]
            qt = gptq.rtn_quantize(w, spec, recipe.weight_clip)
            for name, (lin, rows) in zip(names, _row_slices(lins)):
                _set(layer, name, _atom_linear(qt, rows, perm, recipe.act_clip, lin))
        if recipe.kv_bits == 4:
            layer.self_attn.kv_quantizer = KV4Quantizer(recipe.kv_group)
    return model
