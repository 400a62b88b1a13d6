"""Bridge from the torch ops to the compiled extension (``atom_ops._C``), if it was built.

Each function returns the kernel's output, or None when no kernel applies (no extension,
CPU tensors, no compiled arch for this GPU): the caller then runs the reference.

Requirements of the compiled W4A4 kernels (checked here before any launch, ``FormatError``):
    N % 16 == 0                  output columns (weight rows)
    group % 64 == 0              the default kernels' tile_k is 64 INT4 values
    outliers % 32 == 0           outlier K-tiles are 32 bytes
    K = outliers + n * group     as everywhere (formats.QuantSpec)
    every operand contiguous, packed/outlier base pointers 16-byte aligned, out/residual
    4-byte aligned; any M >= 1.
A kernel with tile_k = 128 (``--level 1``) needs group % 128 == 0 and outliers % 64 == 0; the
extension checks each kernel's own limits again and raises with the kernel's name.
The sm90a wgmma family (Hopper) reads staged operands (atom_ops/staging.py: e4m3 INT4 groups, int8 outliers):
group 128 only, N % 8 == 0, 16-byte aligned out/residual; activations are staged per call
(one CUDA kernel, or written directly by quantize_rows(staged=True)), weights once per weight
tensor (cached). Calls it cannot run fall back to the mma family.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from .formats import FormatError, QuantizedTensor
from . import staging
from .staging import StagedOperand, stage_operand

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
# Revision of the op path's costs (what a tuned table measured). Bumped when a change makes
# older tables wrong: 2 = wgmma activations staged by a CUDA kernel instead of torch ops; 3 = the
# tuner times quantized_linear (the fused quantization writes the operand each family reads), not
# w4a4_gemm on packed activations, which charged the wgmma family a staging launch that the engine
# and AtomLinear never run.
# Tables written by `python -m tuning` record it; the run-time lookup ignores other revisions.
# (Not bumped when the wgmma path's quantization stopped writing the unused packed format: every
# candidate at prefill sizes is a wgmma tile and gains alike, and at decode sizes the dropped
# writes are a few KB of a launch-bound kernel, so the tables' choices stand.)
OP_REVISION = 3
N_ALIGN = 16
GROUP_ALIGN = 64
OUTLIER_ALIGN = 32


@functools.cache
def extension():
    """The compiled extension module, or None when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def available() -> bool:
    return extension() is not None


def kernel_names() -> list[str]:
    """Names of every compiled kernel ([] without the extension)."""
    ext = extension()
    return list(ext.kernel_names()) if ext is not None else []


def kernels_info() -> list[dict]:
    ext = extension()
    return list(ext.kernels()) if ext is not None else []


@functools.cache
def _device_cc(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


@functools.cache
def _staged_only() -> bool:
    """Whether the extension's quantization kernel can write the staged operand alone: a build from
    before it could would write through the null packed pointers."""
    return bool(getattr(extension(), "QUANTIZE_STAGED_ONLY", False))


@functools.cache
def _arch_runs(cc: int) -> bool:
    """Whether the extension has code for compute capability cc."""
    return bool(extension().arch_for(cc))


# The launch path runs once per op call, so its host cost adds up in eager steps (a Llama-7B
# 8-layer prefill step launches ~70 ops; bench.host_overhead times the pieces).
_NO_SWITCH = contextlib.nullcontext()


def on_device(dev: torch.device):
    """``with on_device(dev):`` makes dev the current device for the launches inside, switching
    only when another one is current: ``torch.cuda.device`` costs ~4.5 us on the H100 host even
    when it switches nothing."""
    return _NO_SWITCH if dev.index is None or dev.index == torch.cuda.current_device() else torch.cuda.device(dev)


def raw_stream(dev: torch.device) -> int:
    """dev's current CUDA stream as the integer the extension takes: what
    ``torch.cuda.current_stream(dev).cuda_stream`` gives without building a Stream object (~9 us
    per call on the H100 host); the getter torch's own generated code (inductor) calls."""
    return torch._C._cuda_getCurrentRawStream(dev.index if dev.index is not None else torch.cuda.current_device())


def runnable_kernels(device=None) -> list[dict]:
    """Compiled kernels whose code runs on ``device`` (default: the current CUDA device)."""
    if extension() is None or not torch.cuda.is_available():
        return []
    cc = _device_cc(torch.device(device or "cuda").index or torch.cuda.current_device())
    return [k for k in kernels_info() if k["min_cc"] <= cc <= k["max_cc"]]


@functools.cache
def kernel_info(name: str) -> dict:
    """The registry's metadata of compiled kernel ``name`` (family, arch, tiles, split_k,
    weight_fragments, ...): what callers ask instead of reading the name."""
    for k in kernels_info():
        if k["name"] == name:
            return k
    raise FormatError(f"no compiled kernel named {name!r}")


def kernel_family(name: str) -> str:
    return kernel_info(name)["family"]


# Staged weights of the sm90a wgmma family, made once per weight tensor (atom_ops/staging.py)
# and dropped with it; a weight modified in place (tensor version change) is staged again.
_STAGED_WEIGHTS: dict[int, tuple] = {}


def staged_weight(w: QuantizedTensor) -> StagedOperand:
    key = id(w.packed)
    version = (w.packed._version, w.outlier._version, w.scale._version, w.scale.data_ptr(), w.outlier.data_ptr())
    hit = _STAGED_WEIGHTS.get(key)
    if hit is not None and hit[0]() is w.packed and hit[1] == version:
        return hit[2]
    staged = stage_operand(w)
    ref = weakref.ref(w.packed, lambda _, k=key: _STAGED_WEIGHTS.pop(k, None))
    _STAGED_WEIGHTS[key] = (ref, version, staged)
    return staged


def stage_activation(a: QuantizedTensor) -> StagedOperand:
    """Packed activation -> the wgmma family's staged format with one CUDA kernel (the torch
    path, staging.stage_operand, is the reference)."""
    spec, m, dev = a.spec, a.rows, a.packed.device
    st = staging.empty_staged(spec, m, dev)
    with on_device(dev):
        extension().stage_packed(a.packed.data_ptr(), a.outlier.data_ptr() if spec.outliers else 0,
                                 a.scale.data_ptr(), m, spec.k, spec.group, spec.outliers, st.values.data_ptr(),
                                 st.scale.data_ptr(), st.values.shape[1], raw_stream(dev))
    return st


PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}
_X_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def quantize_rows(x: torch.Tensor, spec, perm: torch.Tensor | None, clip: float, prologue: str = "none",
                  norm_weight: torch.Tensor | None = None, eps: float = 1e-5, staged: bool = False,
                  packed: bool = True):
    """The fused quantization kernel (quant_ops.cu): (QuantizedTensor or None, StagedOperand or None),
    or None when it does not apply (no extension, CPU tensors). ``packed=False`` (with ``staged``)
    writes only the staged operand, all the wgmma GEMM reads. Arguments are checked by the caller
    (atom_ops.quant_ops) except the layout rules checked here."""
    ext = extension()
    if ext is None or not x.is_cuda:
        return None
    if x.dtype not in _X_DTYPE_CODE:
        raise FormatError(f"quantize_activation: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise FormatError("quantize_activation: x rows must be contiguous (x.stride(-1) == 1)")
    if not (packed or staged):
        raise FormatError("quantize_rows: nothing to write (packed=False needs staged=True)")
    if not packed and not _staged_only():
        raise FormatError("quantize_rows: the compiled extension predates staged-only output; rebuild it "
                          "(pip install -e . or the CMake build)")
    m, dev = x.shape[0], x.device
    perm32 = None if perm is None else int32_perm(perm, dev)
    if norm_weight is not None and not _is_plain(norm_weight, dev, x.dtype):
        norm_weight = norm_weight.to(device=dev, dtype=x.dtype).contiguous()
    a = None
    if packed:
        a = QuantizedTensor(torch.empty((m, spec.k_normal // 2), dtype=torch.uint8, device=dev),
                            torch.empty((m, spec.outliers), dtype=torch.int8, device=dev),
                            torch.empty((m, spec.scale_columns), dtype=torch.float16, device=dev), spec)
    st = staging.empty_staged(spec, m, dev) if staged else None
    with on_device(dev):
        try:
            ext.quantize_rows(x.data_ptr(), _X_DTYPE_CODE[x.dtype], x.stride(0),
                              perm32.data_ptr() if perm32 is not None else 0,
                              norm_weight.data_ptr() if norm_weight is not None else 0, float(eps), PROLOGUES[prologue],
                              float(clip), m, spec.k, spec.group, spec.outliers, a.packed.data_ptr() if a else 0,
                              a.outlier.data_ptr() if a and spec.outliers else 0, a.scale.data_ptr() if a else 0,
                              st.values.data_ptr() if st else 0, st.scale.data_ptr() if st else 0,
                              st.values.shape[1] if st else 0, raw_stream(dev))
        except ValueError as e:
            raise FormatError(str(e)) from None
    return a, st


# int32 copies of permutations that a CUDA graph may have captured: kept alive for good once their
# permutation changed, since a graph replays the pointer it saw (a few KB each, and perms of a served
# model do not change)
_CAPTURED_PERMS: list[torch.Tensor] = []


def int32_perm(perm: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """perm as the contiguous int32 tensor on dev that the quantization kernel reads. Models keep
    int64 permutations (checkpoint format), and converting at every call cost a copy kernel per
    quantized linear (3 of a decode step's ~14 kernels per layer), so the converted copy is kept on
    the tensor itself, valid while perm's data pointer (a copy of the tensor, a deepcopy or a loaded
    pickle, has its own), version counter (bumped by any in-place write through any view; writes
    through ``.data`` are not seen) and the device are unchanged. Not made while a CUDA graph is being
    captured (it would live in the graph's pool); one that a capture used outlives its replacement."""
    if _is_plain(perm, dev, torch.int32):
        return perm
    try:
        key = (perm.data_ptr(), perm._version, dev)
    except RuntimeError:  # an inference tensor: no version counter, so nothing to validate a copy by
        key = None
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    cached = perm.__dict__.get("_atom_int32")
    if key is not None and cached is not None:
        if cached[0] == key:
            if capturing:
                cached[2] = True  # a graph holds its pointer now
            return cached[1]
        if cached[2]:
            _CAPTURED_PERMS.append(cached[1])
    with on_device(dev):
        perm32 = perm.to(device=dev, dtype=torch.int32).contiguous()
    if key is not None and not capturing:
        perm._atom_int32 = [key, perm32, False]  # [key, copy, captured]
    return perm32


def _rows_for_kernel(x: torch.Tensor, ext, entry: str) -> bool:
    """x is a 2-D CUDA tensor of a kernel dtype with unit-stride, non-overlapping rows, and the extension
    has `entry` (one built before it does not)."""
    return (ext is not None and x.is_cuda and x.dim() == 2 and x.dtype in _X_DTYPE_CODE and x.stride(-1) == 1
            and (x.shape[0] <= 1 or x.stride(0) >= x.shape[1]) and hasattr(ext, entry))


def fp8_quantize_rows(x: torch.Tensor, silu_mul: bool = False):
    """The FP8 baseline's per-row e4m3 quantization (models/engine/fp8.py) in one kernel:
    (fp8 [M, K], fp32 scales [M, 1]), or None when it does not run here (no extension or one built
    before it, a CPU tensor, another dtype, rows not contiguous or overlapping); the caller then runs
    torch's ops. silu_mul: x is [M, 2K] = [gate | up] and the rows quantized are silu(gate) * up in x's
    dtype (quant_ops.silu_mul_reference), as a serving stack fuses its MLP's activation quantization."""
    ext = extension()
    if not _rows_for_kernel(x, ext, "silu_mul" if silu_mul else "fp8_quantize_rows") or (silu_mul and x.shape[1] % 2):
        return None
    m, k = x.shape[0], x.shape[1] // (2 if silu_mul else 1)
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return out, scale.fill_(1e-12)
    dev = x.device
    with on_device(dev):
        # silu_mul only when set: an extension built before it takes 8 arguments and still serves the plain case
        ext.fp8_quantize_rows(x.data_ptr(), _X_DTYPE_CODE[x.dtype], x.stride(0) if m > 1 else x.shape[1],
                              out.data_ptr(), scale.data_ptr(), m, k, raw_stream(dev), **({"silu_mul": 1} if silu_mul else {}))
    return out, scale


def silu_mul(x: torch.Tensor):
    """silu(gate) * up for x = [gate | up] ([M, 2K] -> [M, K], x's dtype) in one kernel, bit for bit
    quant_ops.silu_mul_reference (torch's F.silu(gate) * up): the fp16 baseline's MLP activation, as a
    serving stack runs it (vLLM's silu_and_mul). None where it does not run (as fp8_quantize_rows)."""
    ext = extension()
    if not _rows_for_kernel(x, ext, "silu_mul") or x.shape[1] % 2:
        return None
    m, k = x.shape[0], x.shape[1] // 2
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0 or k == 0:
        return out
    dev = x.device
    with on_device(dev):
        ext.silu_mul(x.data_ptr(), _X_DTYPE_CODE[x.dtype], x.stride(0) if m > 1 else x.shape[1], out.data_ptr(),
                     m, k, raw_stream(dev))
    return out


def _is_plain(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> bool:
    """t already is a contiguous dtype tensor on dev (no conversion to make)."""
    return t.dtype == dtype and t.device == dev and t.is_contiguous()


@functools.cache
def _compiled_names() -> frozenset[str]:
    return frozenset(kernel_names())


@functools.lru_cache(maxsize=8192)
def _tuned_choice(index: int, cc: int, m: int, n: int, k: int, group: int, outliers: int, code: int) -> tuple[str, int]:
    """(kernel, split_k) from this GPU's tuning table (tuning/runtime.py: $ATOM_TUNING_TABLE or
    tuning/tables/<gpu>.json, same OP_REVISION) when it tuned this (N, K) and the kernel is
    compiled and runs the call; ('', 0) = the compiled dispatch. A table takes effect without
    regenerating the extension."""
    try:
        from tuning.runtime import tuned_choice
    except ImportError:  # tuning/ not importable (installed without it): the compiled dispatch
        return "", 0
    ext = extension()
    choice = tuned_choice(torch.cuda.get_device_name(index), ext.arch_for(cc), m, n, k,
                          "f16" if code == 0 else "bf16", OP_REVISION)
    if choice is None or choice.kernel not in _compiled_names():
        return "", 0
    try:
        ext.plan(choice.kernel, m, n, k, group, outliers, code, choice.split_k, cc)
    except ValueError:  # the tuned kernel cannot run this call (e.g. another group size)
        return "", 0
    return choice.kernel, choice.split_k


def check_gpu_args(a: QuantizedTensor | None, w: QuantizedTensor, residual) -> None:
    """The compiled kernels' layout requirements (module docstring); raises FormatError. ``a`` None:
    the activation is staged by the quantization kernel into fresh buffers (nothing to check)."""
    spec = w.spec
    n = w.rows
    if n % N_ALIGN:
        raise FormatError(f"w4a4_gemm on the GPU needs N % {N_ALIGN} == 0 (weight rows), got N={n}")
    if spec.group % GROUP_ALIGN:
        raise FormatError(f"w4a4_gemm on the GPU needs group % {GROUP_ALIGN} == 0, got group={spec.group}")
    if spec.outliers % OUTLIER_ALIGN:
        raise FormatError(f"w4a4_gemm on the GPU needs outliers % {OUTLIER_ALIGN} == 0, got {spec.outliers}")
    activation = [] if a is None else [("activation.packed", a.packed), ("activation.outlier", a.outlier),
                                       ("activation.scale", a.scale)]
    weight = [("weight.packed", w.packed), ("weight.outlier", w.outlier), ("weight.scale", w.scale)]
    named = activation + weight + ([("residual", residual)] if residual is not None else [])
    for name, t in named:
        if not t.is_contiguous():
            raise FormatError(f"w4a4_gemm: {name} must be contiguous (call .contiguous())")
    for name, t in activation[:2] + weight[:2]:
        if t.numel() and t.data_ptr() % 16:
            raise FormatError(f"w4a4_gemm: {name} must be 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16}); "
                              "pass a freshly allocated tensor, not a slice")
    if residual is not None and residual.data_ptr() % 4:
        raise FormatError("w4a4_gemm: residual must be 4-byte aligned")


def _output(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, dev) -> torch.Tensor:
    """A fresh [m, n] output, or the caller's after checking it fits."""
    if out is None:
        return torch.empty((m, n), dtype=dtype, device=dev)
    if out.shape != (m, n) or out.dtype != dtype or out.device != dev or not out.is_contiguous():
        raise FormatError(f"out must be a contiguous {dtype} [{m}, {n}] tensor on {dev}")
    return out


def w4a4_gemm(a: QuantizedTensor, w: QuantizedTensor, out_dtype: torch.dtype, residual,
              kernel: str = "", split_k: int = 0, out: torch.Tensor | None = None):
    """Run a compiled kernel: ``kernel`` forces one by name ('' = the dispatch table's choice),
    ``split_k`` overrides the split-K factor (0 = the table's), ``out`` is an optional
    preallocated contiguous [M, N] output (tests poison it). None when no kernel applies."""
    if not a.packed.is_cuda:
        if kernel:
            raise FormatError(f"kernel {kernel!r} needs CUDA tensors")
        return None
    ext = extension()
    if ext is None:
        if kernel:
            raise FormatError(f"kernel {kernel!r} requested but the extension atom_ops._C was not built")
        return None
    dev = a.packed.device
    cc = _device_cc(dev.index)
    if not kernel and not _arch_runs(cc):
        return None  # nothing compiled for this GPU: the reference runs
    check_gpu_args(a, w, residual)
    spec = a.spec
    m, n = a.rows, w.rows
    code = _DTYPE_CODE[out_dtype]
    name, split = _plan(kernel, split_k, m, n, spec, code, dev, cc)
    if not name:
        return None
    out = _output(out, m, n, out_dtype, dev)
    if kernel_family(name) == "wgmma":  # Hopper family: staged operands
        with on_device(dev):
            return _launch_staged(name, stage_activation(a), staged_weight(w), code, residual, out, split)
    ws = torch.empty((m, n), dtype=torch.float32, device=dev) if split > 1 else None
    with on_device(dev):
        stream = raw_stream(dev)
        ext.w4a4_gemm(name, a.packed.data_ptr(), a.outlier.data_ptr() if spec.outliers else 0, a.scale.data_ptr(),
                      w.packed.data_ptr(), w.outlier.data_ptr() if spec.outliers else 0, w.scale.data_ptr(),
                      out.data_ptr(), residual.data_ptr() if residual is not None else 0,
                      ws.data_ptr() if ws is not None else 0, m, n, spec.k, spec.group, spec.outliers, code, split,
                      stream)
    return out


def dispatched_kernel(a: QuantizedTensor, w: QuantizedTensor, out_dtype: torch.dtype) -> tuple[str, int]:
    """(kernel name, split-K) that ``w4a4_gemm(a, w, out_dtype, ...)`` runs on these CUDA tensors
    (tuning table, else compiled dispatch); ('', 0) when none does."""
    ext = extension()
    dev = a.packed.device
    if ext is None or not a.packed.is_cuda:
        return "", 0
    cc = _device_cc(dev.index)
    if not _arch_runs(cc):
        return "", 0
    return _plan("", 0, a.rows, w.rows, a.spec, _DTYPE_CODE[out_dtype], dev, cc)


def _plan(kernel: str, split_k: int, m: int, n: int, spec, code: int, dev, cc: int) -> tuple[str, int]:
    """(kernel name, split-K) for this call: the forced kernel, else the tuning table's choice, else
    the compiled dispatch; ('', 0) when no compiled kernel runs it."""
    if not kernel and split_k == 0:
        kernel, split_k = _tuned_choice(dev.index, cc, m, n, spec.k, spec.group, spec.outliers, code)
    try:
        return _planned(kernel, split_k, m, n, spec.k, spec.group, spec.outliers, code, cc)
    except ValueError as e:
        raise FormatError(str(e)) from None


@functools.lru_cache(maxsize=8192)
def _planned(kernel: str, split_k: int, m: int, n: int, k: int, group: int, outliers: int, code: int,
             cc: int) -> tuple[str, int]:
    """The extension's plan (a pure function of its arguments), once per distinct call."""
    return extension().plan(kernel, m, n, k, group, outliers, code, split_k, cc)


def quantized_linear(x: torch.Tensor, w: QuantizedTensor, perm, clip: float, prologue: str, norm_weight, eps: float,
                     out_dtype: torch.dtype, residual, kernel: str = "", split_k: int = 0,
                     out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Prologue + quantization kernel, then the dispatched GEMM kernel; for the wgmma family the
    quantization kernel writes the staged operand itself (no staging launch). None when no
    kernel applies (the caller runs the reference). Arguments are checked by atom_ops.linear.
    ``kernel`` / ``split_k`` / ``out`` as in w4a4_gemm (the tuner forces candidates through here)."""
    ext = extension()
    if ext is None or not x.is_cuda:
        return None
    dev = x.device
    cc = _device_cc(dev.index)
    if not _arch_runs(cc):
        return None
    spec, m, n = w.spec, x.shape[0], w.rows
    name, split = _plan(kernel, split_k, m, n, spec, _DTYPE_CODE[out_dtype], dev, cc)
    if not name:
        return None
    if kernel_family(name) != "wgmma":
        a, _ = quantize_rows(x, spec, perm, clip, prologue, norm_weight, eps)
        return w4a4_gemm(a, w, out_dtype, residual, kernel=name, split_k=split, out=out)
    # The wgmma family: the quantization kernel writes only the staged operand the GEMM reads.
    check_gpu_args(None, w, residual)
    with on_device(dev):
        _, sa = quantize_rows(x, spec, perm, clip, prologue, norm_weight, eps, staged=True, packed=not _staged_only())
        return _launch_staged(name, sa, staged_weight(w), _DTYPE_CODE[out_dtype], residual,
                              _output(out, m, n, out_dtype, dev), split)


def staged_gemm(sa: StagedOperand, sw: StagedOperand, out_dtype: torch.dtype, residual=None, kernel: str = "",
                out: torch.Tensor | None = None, split_k: int = 1) -> torch.Tensor:
    """The sm90a wgmma family on already staged operands (atom_ops/staging.py): what a fused
    quantize kernel feeds directly, and what bench.gemm times as the kernel alone. ``split_k``
    applies to the kernels built with split-K (``_sk``), else it is 1."""
    ext = extension()
    if ext is None or not sa.values.is_cuda:
        raise FormatError("staged_gemm needs CUDA tensors and the compiled extension")
    spec = sa.spec
    m, n, dev = sa.rows, sw.rows, sa.values.device
    code = _DTYPE_CODE[out_dtype]
    try:
        name, split = ext.plan(kernel, m, n, spec.k, spec.group, spec.outliers, code, split_k,
                               _device_cc(dev.index or 0))
    except ValueError as e:
        raise FormatError(str(e)) from None
    if not name or kernel_family(name) != "wgmma":
        raise FormatError(f"staged_gemm: no wgmma-family kernel for M={m} N={n} {spec} on this device")
    for label, t in (("activation", sa), ("weight", sw)):
        if not (t.values.is_contiguous() and t.scale.is_contiguous()) or t.values.device != dev:
            raise FormatError(f"staged_gemm: staged {label} must be contiguous and on {dev}")
    if sa.spec != sw.spec:
        raise FormatError(f"staged_gemm: activation spec {sa.spec} does not match weight spec {sw.spec}")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != out_dtype or not residual.is_contiguous()):
        raise FormatError(f"residual must be a contiguous {out_dtype} [{m}, {n}] tensor")
    with on_device(dev):
        return _launch_staged(name, sa, sw, code, residual, _output(out, m, n, out_dtype, dev), split)


def uses_weight_fragments(name: str) -> bool:
    """Whether compiled kernel ``name`` reads staging.weight_fragments (config weights="frag4", _w4)."""
    return kernel_info(name)["weight_fragments"]


def _launch_staged(name: str, sa: StagedOperand, sw: StagedOperand, code: int, residual, out: torch.Tensor,
                   split: int = 1):
    """Launch wgmma kernel ``name`` (planned, arguments checked; ``split``: its split-K factor, 1
    unless built with split-K) on the current device's stream."""
    spec = sa.spec
    stream = raw_stream(out.device)
    # _w4 kernels read the weights as 4-bit register fragments (made once per staged weight)
    frag4 = staging.weight_fragments(sw).data_ptr() if uses_weight_fragments(name) else 0
    extension().w4a4_gemm(name, 0, 0, 0, 0, 0, 0, out.data_ptr(), residual.data_ptr() if residual is not None else 0,
                          0, sa.rows, sw.rows, spec.k, spec.group, spec.outliers, code, split, stream,
                          a_staged=sa.values.data_ptr(), a_staged_scale=sa.scale.data_ptr(),
                          w_staged=sw.values.data_ptr(), w_staged_scale=sw.scale.data_ptr(),
                          k_staged=sw.values.shape[1], w_frag4=frag4)
    return out


# ----------------------------------------------------------------------- int8 family
# A plain CUTLASS INT8 GEMM emitted by our generator (no groups, no scales): the GEMM
# benchmark's ceiling for the W4A4 kernels, not a model op. out = a @ b.T exactly (int32).
# Requirements: a [M, K] and b [N, K] int8, contiguous, on the same CUDA device, K % 16 == 0,
# N % 16 == 0, base pointers 16-byte aligned; any M >= 1.
INT8_ALIGN = 16


def int8_kernels_info() -> list[dict]:
    """Metadata of the compiled int8-family kernels ([] without the extension)."""
    ext = extension()
    return list(ext.int8_kernels()) if ext is not None and hasattr(ext, "int8_kernels") else []


def _check_int8_args(a: torch.Tensor, b: torch.Tensor, out) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"int8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise FormatError(f"int8_gemm: {name} must be int8, got {t.dtype}")
        if t.dim() != 2:
            raise FormatError(f"int8_gemm: {name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_cuda:
            raise FormatError(f"int8_gemm: {name} must be a CUDA tensor (the kernel is GPU-only), got {t.device}")
        if not t.is_contiguous():
            raise FormatError(f"int8_gemm: {name} must be contiguous (b is the weight [N, K], row-major)")
        if t.data_ptr() % 16:
            raise FormatError(f"int8_gemm: {name} must be 16-byte aligned (pass a fresh tensor, not a slice)")
    if a.device != b.device:
        raise FormatError(f"int8_gemm: a is on {a.device}, b on {b.device}")
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise FormatError(f"int8_gemm: a is [M={m}, K={k}] but b is [N={n}, K={kb}] (b must be [N, K])")
    if m < 1 or n < 1 or k < 1:
        raise FormatError(f"int8_gemm: empty problem M={m}, N={n}, K={k}")
    if k % INT8_ALIGN:
        raise FormatError(f"int8_gemm needs K % {INT8_ALIGN} == 0, got K={k}")
    if n % INT8_ALIGN:
        raise FormatError(f"int8_gemm needs N % {INT8_ALIGN} == 0, got N={n}")
    if out is not None and (out.shape != (m, n) or out.dtype != torch.int32 or out.device != a.device
                            or not out.is_contiguous() or out.data_ptr() % 16):
        raise FormatError(f"int8_gemm: out must be a contiguous, 16-byte aligned int32 [{m}, {n}] tensor on {a.device}")


def int8_gemm(a: torch.Tensor, b: torch.Tensor, kernel: str | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] int32 = a[M, K] int8 @ b[N, K]^T int8 with a compiled int8-family kernel
    (``kernel`` forces one by name; None = the best one compiled for this GPU). Raises
    FormatError on bad arguments or when no int8 kernel runs here (no CPU fallback)."""
    _check_int8_args(a, b, out)
    ext = extension()
    if ext is None or not hasattr(ext, "int8_gemm"):
        raise FormatError("int8_gemm needs the compiled extension atom_ops._C (with the int8 family)")
    m, k = a.shape
    n = b.shape[0]
    dev = a.device
    if out is None:
        out = torch.empty((m, n), dtype=torch.int32, device=dev)
    with on_device(dev):
        stream = raw_stream(dev)
        try:
            ext.int8_gemm(kernel or "", a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, stream)
        except ValueError as e:  # no int8 kernel for this GPU, unknown name, unsupported shape
            raise FormatError(str(e)) from None
    return out


def int8_kernel_for(m: int, n: int, k: int, kernel: str | None = None, device=None) -> str:
    """Name of the int8 kernel that ``int8_gemm`` runs for this shape (FormatError if none)."""
    ext = extension()
    if ext is None or not hasattr(ext, "int8_plan"):
        raise FormatError("int8_gemm needs the compiled extension atom_ops._C (with the int8 family)")
    cc = _device_cc(torch.device(device or "cuda").index or torch.cuda.current_device())
    try:
        return ext.int8_plan(kernel or "", m, n, k, cc)
    except ValueError as e:
        raise FormatError(str(e)) from None
