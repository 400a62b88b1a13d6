"""Filesystem locations used by the generator (one place; pass directories as arguments)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
DEFAULT_OUT = REPO / "build" / "generated"
MODELS_CONFIG = REPO / "models" / "config.py"
FORMAT_RULES = REPO / "atom_ops" / "rules.py"
TUNING_TABLES = REPO / "tuning" / "tables"  # the committed per-GPU dispatch tables (python -m tuning)
