"""The real objective: median kernel time (CUDA events) of one candidate on one GEMM problem.

A ``GemmProblem`` holds random fp16 activations and quantized weights for (M, N, K) on the GPU and
the reference output of ``atom_ops.formats.w4a4_matmul_reference``. ``measure(candidate)`` runs the
path a quantized layer runs, the fused activation quantization then the candidate GEMM forced by name
(``atom_ops.kernels.quantized_linear(kernel=..., split_k=...)``: the quantization kernel writes the
operand the candidate's family reads, staged for the wgmma family, so no family pays a launch the
layers never run), checks its output
against the reference (a NaN-poisoned buffer, so unwritten elements fail) and only then times
it with ``bench.common.time_cuda``: warm-up, L2 flushed before every timed call, median of
``iters`` CUDA-event intervals (CUDA-graph replays by default, so host launch overhead does not
hide the kernel differences at small M). Anything wrong raises ``CandidateRejected`` with the
reason; the study turns that into a pruned trial.
"""

from __future__ import annotations

import math

import torch

from atom_ops import formats, kernels
from atom_ops.formats import QuantSpec
from bench.common import L2Flusher, time_cuda

from .space import Candidate

OUT_DTYPE = torch.float16
CLIP = 0.9  # activation clipping of the timed problems
# Output tolerance: one fp16 ulp relative (1e-3) plus float32 summation-order noise relative to
# the output's magnitude (tests/test_gemm_gpu.py uses the same bound).
RTOL = 1e-3
ATOL_REL_MAX = 1e-5
# Errors after which the CUDA context is unusable: every later launch in this process fails.
# The one-call pre-check includes host launch overhead (tens of us), so it only prunes when the
# best so far is long enough for that not to matter.
MIN_PRUNE_US = 200.0
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                      "illegal instruction", "device-side assert", "hardware stack error")


class CandidateRejected(Exception):
    """A candidate that cannot count: the message is the reason stored on the pruned trial.
    ``fatal``: the CUDA context is broken, so the run must stop (a new process resumes)."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


def check_output(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when ``out`` matches ``ref`` within tolerance, else the reason."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"output {out.dtype} {tuple(out.shape)} != reference {ref.dtype} {tuple(ref.shape)}"
    o, r = out.float(), ref.float()
    nonfinite = int((~torch.isfinite(o)).sum())
    if nonfinite:
        return f"{nonfinite} non-finite output elements (unwritten or overflow)"
    err = (o - r).abs()
    tol = RTOL * r.abs() + ATOL_REL_MAX * r.abs().max() + 1e-6
    bad = int((err > tol).sum())
    if bad:
        return f"wrong output: {bad} of {err.numel()} elements out of tolerance, max abs err {float(err.max()):.3g}"
    return None


class GemmProblem:
    """Operands, reference and a reusable output buffer for one (M, N, K) on the current GPU."""

    def __init__(self, m: int, n: int, k: int, group: int, outliers: int, seed: int = 0):
        self.m, self.n, self.k = m, n, k
        self.spec = QuantSpec(k, group, outliers)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(m, k, device="cuda", generator=gen)
        x[:, self.spec.k_normal:] *= 8  # outlier channels are the large ones
        w = torch.randn(n, k, device="cuda", generator=gen)
        self.x = x.to(OUT_DTYPE)  # what a layer's quantized_linear receives
        self.w = formats.quantize_operand(w, self.spec, clip=0.85)
        del x, w
        a = formats.quantize_activation(self.x, self.spec, None, CLIP)  # the fused kernel's exact output
        self.ref = formats.w4a4_matmul_reference(a, self.w, OUT_DTYPE, None)
        self.out = torch.empty((m, n), dtype=OUT_DTYPE, device="cuda")

    def run(self, cand: Candidate) -> torch.Tensor:
        got = kernels.quantized_linear(self.x, self.w, None, CLIP, "none", None, 1e-5, OUT_DTYPE, None,
                                       kernel=cand.kernel, split_k=cand.split_k, out=self.out)
        if got is None:
            raise CandidateRejected("atom_ops returned no kernel output (extension not loaded for this GPU?)")
        return got


class CudaObjective:
    """``measure(candidate, best_us)`` -> timing dict for one (M, N, K), or CandidateRejected."""

    def __init__(self, problem: GemmProblem, iters: int = 20, warmup: int = 3, graph: bool = True,
                 slow_factor: float = 3.0, flush: L2Flusher | None = None):
        self.problem = problem
        self.iters, self.warmup, self.graph = iters, warmup, graph
        self.slow_factor = slow_factor
        self.flush = flush or L2Flusher()

    def _one_call_us(self, cand: Candidate) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush()
        start.record()
        self.problem.run(cand)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    def measure(self, cand: Candidate, best_us: float | None = None) -> dict:
        p = self.problem
        try:
            if kernels.extension() is None:
                raise CandidateRejected("atom_ops._C is not built: nothing to time (tuning/README.md)", fatal=True)
            if cand.kernel not in set(kernels.kernel_names()):
                raise CandidateRejected(f"{cand.kernel} is not compiled into atom_ops._C")
            p.out.fill_(float("nan"))
            got = p.run(cand)
            torch.cuda.synchronize()
            why = check_output(got, p.ref)
            if why:
                raise CandidateRejected(why)
            # One flushed call first: a candidate far slower than the best so far is not worth
            # the full measurement (saves most of the time at large M).
            first = self._one_call_us(cand)
            if best_us is not None and best_us >= MIN_PRUNE_US and first > self.slow_factor * best_us:
                raise CandidateRejected(f"too slow: one call took {first:.1f} us, more than "
                                        f"{self.slow_factor:g}x the best so far ({best_us:.1f} us)")
            r = time_cuda(lambda: p.run(cand), iters=self.iters, warmup=self.warmup, flush=self.flush,
                          graph=self.graph)
        except CandidateRejected:
            raise
        except formats.FormatError as e:  # the kernel's own checks (e.g. tile_k vs group)
            raise CandidateRejected(f"rejected by the kernel: {e}") from None
        except (RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise CandidateRejected(f"{type(e).__name__}: {msg}",
                                    fatal=any(s in msg.lower() for s in STICKY_CUDA_ERRORS)) from None
        if not math.isfinite(r["median_us"]) or r["median_us"] <= 0:
            raise CandidateRejected(f"bad timing {r['median_us']!r}")
        r["timing"] = "cuda_graph" if self.graph else "eager"
        return r
