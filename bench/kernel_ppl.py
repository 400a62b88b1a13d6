"""Does the GPU kernel path's perplexity equal the pure-torch reference's, and if not, which op moves it?

    python -m bench.kernel_ppl        (a CUDA GPU with the extension, the shipped SmolLM2, the eval data)

Quantizes the shipped SmolLM2 with the Atom recipe (2 calibration windows of 1024 tokens, as
tests/test_real_model.py does) and prints its WikiText-2 perplexity on 2 windows through: all
kernels; reference quantization + kernel GEMM; kernel quantization + reference GEMM; all references.
Then kernels vs references on 8 and 32 windows. The README's "GPU kernel path's perplexity" numbers
come from it (bench/results/kernel_ppl_h100.log: since the ninth session all four paths print the same
value, the kernels computing the references' arithmetic bit for bit).
"""

import contextlib
import copy

import torch

from atom_ops import formats, kernels, quant_ops
from models.data import split_text, wikitext_ids
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
        elif OP_PATHS[name] is not None:
            kernels.quantized_linear = OP_PATHS[name](kernel_path)
        yield
    finally:
        kernels.quantized_linear, kernels.extension = kernel_path, extension


def main() -> int:
    model, tok, _ = load_model(None)
    split = split_text(wikitext_ids(tok), seqlen=1024, calib_samples=4)
    q = copy.deepcopy(model).cuda()
    quantize_model(q, split.calib_windows[:2, :1024], ATOM, progress=False)
    q = q.half()
    q.model.rotary_emb.reset_buffers("cuda")
    with torch.no_grad():
        for name in OP_PATHS:
            with op_path(name):
                print(f"ppl {name}: {perplexity(q, split.eval_windows[:2], progress=False):.4f}")
        # More text: float-order differences are noise that averages out over tokens.
        for n in (8, 32):
            w = split.eval_windows[:n]
            fast = perplexity(q, w, progress=False)
            with op_path("reference"):
                ref = perplexity(q, w, progress=False)
            print(f"ppl {n} windows: kernels {fast:.4f}, reference {ref:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
