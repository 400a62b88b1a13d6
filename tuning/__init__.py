"""Per-GPU autotuning of the W4A4 GEMM dispatch (``python -m tuning``).

One optuna study per kernel family, per (N, K) linear shape and per M bucket, over the
compiled candidates (generator manifest configs x runtime knobs such as the split-K factor);
the winners become a dispatch table ``tuning/tables/<gpu>.json`` that
``python -m generator --tuning`` compiles in. ``tuning/README.md`` has the workflow.

Modules (one job each): ``gpu`` (device detection), ``shapes`` (a model's linear shapes),
``space`` (candidates per shape), ``objective`` (CUDA-event timing with a correctness check),
``study`` (optuna studies, SQLite storage, budget, progress), ``table`` (the dispatch table:
build, validate, write, look up), ``cli``.

Importing this package (or ``tuning.table``) needs neither torch nor optuna.
"""
