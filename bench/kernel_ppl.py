"""Which op moves the GPU kernel path's perplexity off the pure-torch reference's?

    python -m bench.kernel_ppl        (a CUDA GPU with the extension, the shipped SmolLM2, the eval data)

Quantizes the shipped SmolLM2 with the Atom recipe (2 calibration windows of 1024 tokens, as
tests/test_real_model.py does) and prints its WikiText-2 perplexity on 2 windows through: all
kernels; RMSNorm in torch then the fused quantization kernel; reference quantization + kernel GEMM;
kernel quantization + reference GEMM; all references. Then kernels vs references on 8 and 32
windows. The README's "GPU kernel path's perplexity" numbers come from it (H200).
"""

import copy

import torch

from atom_ops import kernels, quant_ops
from models.data import split_text, wikitext_ids
from models.eval import perplexity
from models.loading import load_model
from models.quantize import quantize_model
from models.recipe import ATOM


def main() -> int:
    model, tok, _ = load_model(None)
    split = split_text(wikitext_ids(tok), seqlen=1024, calib_samples=4)
    q = copy.deepcopy(model).cuda()
    quantize_model(q, split.calib_windows[:2, :1024], ATOM, progress=False)
    q = q.half()
    q.model.rotary_emb.reset_buffers("cuda")
    win = split.eval_windows[:2]
    orig_ext, orig_rows, orig_gemm = kernels.extension, kernels.quantize_rows, kernels.w4a4_gemm
    res = {}
    with torch.no_grad():
        res["kernels"] = perplexity(q, win, progress=False)
        # RMSNorm in torch (the reference's order), then the fused kernel with no prologue
        def rows_torch_norm(x, spec, perm, clip, prologue="none", norm_weight=None, eps=1e-5):
            if prologue == "rmsnorm":
                x, prologue = quant_ops.rmsnorm_reference(x, norm_weight, eps), "none"
            return orig_rows(x, spec, perm, clip, prologue, norm_weight, eps)
        kernels.quantize_rows = rows_torch_norm
        res["kernels, rmsnorm in torch"] = perplexity(q, win, progress=False)
        kernels.quantize_rows = lambda *a, **k: None  # every quantization by the reference, GEMM by kernels
        res["reference quantization, kernel GEMM"] = perplexity(q, win, progress=False)
        kernels.quantize_rows = orig_rows
        kernels.w4a4_gemm = lambda *a, **k: None      # kernel quantization, reference GEMM
        res["kernel quantization, reference GEMM"] = perplexity(q, win, progress=False)
        kernels.extension = lambda: None
        res["reference"] = perplexity(q, win, progress=False)
    for k, v in res.items():
        print(f"ppl {k}: {v:.4f}")
    # More text: float-order differences are noise that averages out over tokens.
    with torch.no_grad():
        kernels.extension, kernels.quantize_rows, kernels.w4a4_gemm = orig_ext, orig_rows, orig_gemm
        for n in (8, 32):
            w = split.eval_windows[:n]
            fast = perplexity(q, w, progress=False)
            kernels.extension = lambda: None
            ref = perplexity(q, w, progress=False)
            kernels.extension = orig_ext
            print(f"ppl {n} windows: kernels {fast:.4f}, reference {ref:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
