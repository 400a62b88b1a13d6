"""How the atom ops join the torch dispatcher: ``@atom_op(name)`` over a typed Python function.

torch.library.custom_op would do it too, but wraps every call in Python layers (its autograd
kernel, a redispatch below autograd, an output-aliasing check, a dynamo-disabled wrapper): ~17 us of
host time per call against ~6 us for this registration on the H100 machine's host (`python -m
bench.host_overhead`, the "op layer" rows; more on a busy host). An eager prefill step of the shipped
30-layer SmolLM2 calls these ops ~6 times per layer, with GPU work far shorter than the launches, so
the layers showed up in its throughput. Here, as vLLM's
``direct_register_custom_op`` does, the schema is inferred from the annotations (the same
``torch.library.infer_schema`` custom_op uses), the function is the op's kernel for every backend
(CompositeExplicitAutograd: CPU reference and GPU launch alike) and the fake impl is registered with
``torch.library.register_fake("atom::<name>")``; torch.compile, opcheck and ``torch.ops.atom.<name>``
see the same op as before.

What custom_op did that this does not: (1) no autograd formula either way (these are inference
kernels), but custom_op raised at backward time; here torch's default autograd fallback applies
(an input that requires grad gives an output whose backward warns that the op has no autograd
kernel and passes no gradient; torch calls that behaviour deprecated, so a later torch may raise
instead). Callers that may run under autograd keep torch's ops instead (models/llama.py RoPE,
models/engine/fused_layers.py). (2) custom_op bumped the version counter of every argument an op
mutates; here the op does it itself where a kernel writes by pointer (kv4_append's GPU path; its
reference path writes with torch's in-place ops, which bump it).
"""

from __future__ import annotations

from typing import Callable

import torch

# The "atom" namespace's registrations; dropping this object would unregister them.
_LIB = torch.library.Library("atom", "FRAGMENT")


def atom_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Decorator: define ``atom::<name>`` from fn's annotations with fn as its kernel; returns the
    op (``torch.ops.atom.<name>.default``), called like fn. Register its fake impl with
    ``@torch.library.register_fake("atom::<name>")``."""
    def register(fn: Callable) -> torch._ops.OpOverload:
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(torch.ops.atom, name).default
    return register
