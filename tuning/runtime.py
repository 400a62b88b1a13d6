"""Run-time use of the tuning table by atom_ops (no rebuild needed): the tuned (kernel, split_k)
of a call, when a table for this GPU exists and has tuned the call's (N, K).

The table is ``$ATOM_TUNING_TABLE`` if set (``off`` disables it), else
``tuning/tables/<gpu-slug>.json``. A missing table means None (the compiled dispatch runs); an
invalid one is reported once as a warning and ignored, so a bad file never breaks inference.
Torch-free and optuna-free; the caller checks that the kernel is compiled and can run the call.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

from generator.configs import ConfigError

from .gpu import gpu_slug
from .table import Choice, lookup, read_table, table_path

ENV_TABLE = "ATOM_TUNING_TABLE"


@functools.cache
def runtime_table(gpu_name: str, op_revision: int | None = None) -> dict | None:
    """The validated table for ``gpu_name`` (cached per process), or None. With ``op_revision``
    (atom_ops.kernels.OP_REVISION), a table measured on another revision of the op path (or
    one that does not say) is ignored with a warning: its timings no longer hold."""
    env = os.environ.get(ENV_TABLE, "")
    if env.lower() == "off":
        return None
    path = Path(env) if env else table_path(gpu_slug(gpu_name))
    if not path.is_file():
        if env:
            warnings.warn(f"{ENV_TABLE}={env}: no such file; using the compiled dispatch", stacklevel=2)
        return None
    try:
        table = read_table(path)
    except ConfigError as e:
        warnings.warn(f"ignoring the tuning table: {e}", stacklevel=2)
        return None
    if table.get("gpu") != gpu_name:
        warnings.warn(f"ignoring the tuning table {path}: it is for {table.get('gpu')!r}, this GPU is "
                      f"{gpu_name!r}", stacklevel=2)
        return None
    measured = (table.get("tuning") or {}).get("op_revision")
    if op_revision is not None and measured != op_revision:
        warnings.warn(f"ignoring the tuning table {path}: measured on op revision {measured!r}, this atom_ops "
                      f"is revision {op_revision}; rerun `python -m tuning`", stacklevel=2)
        return None
    return table


@functools.lru_cache(maxsize=4096)
def tuned_choice(gpu_name: str, arch: str, m: int, n: int, k: int, out_dtype: str,
                 op_revision: int | None = None) -> Choice | None:
    """The table's choice for a call whose (N, K) it tuned; None otherwise (use the dispatch)."""
    table = runtime_table(gpu_name, op_revision)
    return lookup(table, arch, m, n, k, out_dtype, generic=False) if table else None
