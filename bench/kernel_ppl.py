"""Does the GPU kernel path's perplexity equal the pure-torch reference's, and if not, which op moves it?

    python -m bench.kernel_ppl        (a CUDA GPU with the extension, the shipped SmolLM2, the eval data)

Quantizes the shipped SmolLM2 with the Atom recipe (2 calibration windows of 1024 tokens, as
tests/test_real_model.py does) and prints its WikiText-2 perplexity on 2 windows through: all
kernels; reference quantization + kernel GEMM; kernel quantization + reference GEMM; all references.
Then kernels vs references on 8 and 32 windows; the served model (an Engine over KV4 pages: the
regrouped layers and the KV4 kernels, models/engine/scoring.py) through the kernels and through the
references on 2, 8 and 32 windows, compared at 3 significant digits (printed, not enforced: the RMSNorm
kernel's summation order flips rare 4-bit steps, which this small model amplifies), beside the plain model's
figure (the regrouped layers round elsewhere: RMSNorm inside the quantization kernel, residuals added
before the output rounding); and the unquantized fp16 model served vs plain (the harness's check). The README's "GPU kernel path's perplexity" numbers
come from it (bench/results/kernel_ppl_h100.log: since the ninth session all four paths print the same
value, the kernels computing the references' arithmetic bit for bit).
"""

import contextlib
import copy
import math

import torch

from atom_ops import attention, formats, kernels, quant_ops
from models.data import split_text, wikitext_ids
from models.engine.scoring import served_model_perplexity
from models.eval import perplexity
from models.loading import load_model
from models.quantize import quantize_model
from models.recipe import ATOM


# Every AtomLinear runs atom_ops.quantized_linear, whose GPU path is kernels.quantized_linear
# (quantization kernel, then GEMM kernel). Each op path replaces that bridge (same arguments).
# (The plain model quantizes after torch's RMSNorm; the RMSNorm prologue runs only in the engine's
# fused layers, models/engine/fused_layers.py.)
def _reference_quantization(kernel_path):
    def run(x, w, perm, clip, prologue, norm_weight, eps, out_dtype, residual):
        a = formats.quantize_activation(quant_ops.prologue_reference(x, prologue, norm_weight, eps), w.spec, perm, clip)
        return kernels.w4a4_gemm(a, w, out_dtype, residual)
    return run


def _reference_gemm(kernel_path):
    def run(x, w, perm, clip, prologue, norm_weight, eps, out_dtype, residual):
        a, _ = kernels.quantize_rows(x, w.spec, perm, clip, prologue, norm_weight, eps)
        return formats.w4a4_matmul_reference(a, w, out_dtype, residual)
    return run


OP_PATHS = {"kernels": None, "reference quantization, kernel GEMM": _reference_quantization,
            "kernel quantization, reference GEMM": _reference_gemm, "reference": None}


@contextlib.contextmanager
def op_path(name: str):
    """Run the model's quantized linears through one of OP_PATHS ("reference": every op's reference)."""
    kernel_path, extension = kernels.quantized_linear, kernels.extension
    try:
        if name == "reference":
            kernels.extension = lambda: None
            attention._extension_has.cache_clear()  # the KV4 / paged attention ops ask once, then cache
        elif OP_PATHS[name] is not None:
            kernels.quantized_linear = OP_PATHS[name](kernel_path)
        yield
    finally:
        kernels.quantized_linear, kernels.extension = kernel_path, extension
        attention._extension_has.cache_clear()


def half_unit_of_third_digit(x: float) -> float:
    """Two values within this of x agree with it to 3 significant digits (issue 8's bar)."""
    return 0.5 * 10 ** (math.floor(math.log10(abs(x))) - 2)


def gpu_half_copy(model, calib_windows: torch.Tensor | None = None):
    """A copy of `model` on the GPU in fp16, first quantized with the Atom recipe on `calib_windows`
    when given (what this bench and tests/test_real_model.py evaluate), RoPE buffers rebuilt there."""
    m = copy.deepcopy(model).cuda()
    if calib_windows is not None:
        quantize_model(m, calib_windows, ATOM, progress=False)
    m = m.half()
    m.model.rotary_emb.reset_buffers("cuda")
    return m


def main() -> int:
    model, tok, _ = load_model(None)
    split = split_text(wikitext_ids(tok), seqlen=1024, calib_samples=4)
    q = gpu_half_copy(model, split.calib_windows[:2, :1024])
    with torch.no_grad():
        refs = {}
        for name in OP_PATHS:
            with op_path(name):
                ppl = perplexity(q, split.eval_windows[:2], progress=False)
            if name == "reference":
                refs[2] = ppl
            print(f"ppl {name}: {ppl:.4f}")
        # More text: float-order differences are noise that averages out over tokens.
        for n in (8, 32):
            w = split.eval_windows[:n]
            fast = perplexity(q, w, progress=False)
            with op_path("reference"):
                refs[n] = perplexity(q, w, progress=False)
            print(f"ppl {n} windows: kernels {fast:.4f}, reference {refs[n]:.4f}")
        # The served model (engine): through the kernels and through every op's reference (the same
        # regrouped arithmetic), and against the plain model's (other roundings: module doc)
        for n in (2, 8, 32):
            w = split.eval_windows[:n]
            served = served_model_perplexity(q, w, "kv4")
            with op_path("reference"):
                served_ref = served_model_perplexity(q, w, "kv4")
            agree = abs(served - served_ref) <= half_unit_of_third_digit(served_ref)
            print(f"ppl {n} windows: served (engine, KV4 pages) kernels {served:.4f}, references {served_ref:.4f} "
                  f"({'equal' if agree else 'NOT equal'} to 3 significant digits); plain model {refs[n]:.4f}")
        # The scoring harness itself, on the unquantized fp16 model (no 4-bit rounding to amplify
        # differences): served (merged projections, fused RMSNorm, float pages) vs the plain forward
        fp16 = gpu_half_copy(model)
        w = split.eval_windows[:8]
        print(f"ppl 8 windows, fp16 model: served {served_model_perplexity(fp16, w, 'float'):.4f}, "
              f"plain {perplexity(fp16, w, progress=False):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
