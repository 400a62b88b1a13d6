"""atom_ops.rope: the RoPE op against torch's formula (CPU: the reference path and the errors;
GPU: the kernel, bit-exact over shapes, layouts and both dtypes)."""

from __future__ import annotations

import pytest
import torch

from atom_ops import FormatError, kernels
from atom_ops.rope import apply_rope, apply_rope_reference


def formula(x, cos, sin):
    """HF's apply_rotary_pos_emb, written out independently of atom_ops.rope."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def angles(B, T, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 8192, (B, T, 1), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat((pos * inv, pos * inv), dim=-1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def test_reference_is_the_formula():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = angles(2, 5, 16, torch.float32, "cpu")
    assert torch.equal(apply_rope(x, cos, sin), formula(x, cos, sin))
    xh = x.half()
    ch, sh = angles(2, 5, 16, torch.float16, "cpu")
    assert torch.equal(apply_rope_reference(xh, ch, sh), formula(xh, ch, sh))


def test_errors_name_the_problem():
    x = torch.randn(1, 2, 3, 8)
    cos, sin = angles(1, 3, 8, torch.float32, "cpu")
    with pytest.raises(FormatError, match=r"x must be \[B, H, T, D\] with an even D"):
        apply_rope(torch.randn(1, 2, 3, 7), cos, sin)
    with pytest.raises(FormatError, match=r"cos must be \[B, T, D\]"):
        apply_rope(x, cos[:, :2], sin)
    with pytest.raises(FormatError, match="sin must be torch.float32"):
        apply_rope(x, cos, sin.half())


def test_opcheck_cpu():
    x = torch.randn(1, 2, 3, 8)
    cos, sin = angles(1, 3, 8, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.atom.apply_rope.default, (x, cos, sin))


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.available(),
                               reason="needs a CUDA GPU and the compiled extension atom_ops._C")


@pytest.mark.gpu
@needs_gpu
def test_kernel_is_bit_exact():
    """The engine's q view (a head split of fused qkv rows), contiguous x, decode (T = 1), GQA-sized
    head counts, D 64 / 128 / 96 / 6, an unaligned view (the one-column path), large values."""
    cases = [(1, 32, 300, 128), (3, 8, 1, 128), (2, 9, 17, 64), (1, 4, 33, 96), (2, 3, 5, 6), (64, 32, 1, 128)]
    failures, runs = [], 0
    for i, (B, H, T, D) in enumerate(cases):
        for dtype in (torch.float16, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(i)
            cos, sin = angles(B, T, D, dtype, "cuda", seed=i)
            ld = 3 * H * D + 8  # fused qkv rows (+ padding): q = rows[:, :H*D] viewed [B, H, T, D]
            rows = (torch.randn(B * T, ld, device="cuda", generator=g) * 50).to(dtype)
            views = {"qkv": rows[:, :H * D].view(B, T, H, D).transpose(1, 2),
                     "contiguous": rows[:, :H * D].reshape(B, T, H, D).transpose(1, 2).contiguous(),
                     "unaligned": rows[:, 1:1 + H * D].view(B, T, H, D).transpose(1, 2)}
            for name, x in views.items():
                got, want = apply_rope(x, cos, sin), formula(x, cos, sin)
                runs += 1
                if got.shape != want.shape or not torch.equal(got, want):
                    failures.append(f"{(B, H, T, D)} {dtype} {name}: {int((got != want).sum())} of {want.numel()} differ")
    assert runs and not failures, "\n".join(failures)
    # the op on CUDA: schema, fake tensor, CUDA graph capture
    x = torch.randn(2, 4, 3, 128, device="cuda", dtype=torch.float16)
    cos, sin = angles(2, 3, 128, torch.float16, "cuda")
    torch.library.opcheck(torch.ops.atom.apply_rope.default, (x, cos, sin))
    graph = torch.cuda.CUDAGraph()
    apply_rope(x, cos, sin)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = apply_rope(x, cos, sin)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, formula(x, cos, sin))
