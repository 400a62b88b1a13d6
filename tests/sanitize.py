"""Entry point of the test modules' `--sanitize` mode (compute-sanitizer over a few kernel launches).

    compute-sanitizer --tool memcheck python tests/test_<ops>.py --sanitize

PyTorch's caching allocator hands out tensors inside large cudaMalloc segments, so memcheck cannot
see a kernel writing past the end of a tensor into its neighbour. With the caching allocator off,
every tensor is its own allocation and such a write is reported.
"""

from __future__ import annotations

import os
import sys


def run_if_asked(sanitize_main) -> None:
    """Run sanitize_main() and exit with its status when the script was started with --sanitize."""
    if "--sanitize" not in sys.argv:
        return
    import torch  # noqa: F401  (imported by the caller already; the allocator starts with the first tensor)
    if torch.cuda.is_initialized():
        raise RuntimeError("--sanitize: CUDA was initialized before the caching allocator could be turned off")
    os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    raise SystemExit(sanitize_main())
