"""Kernel generator: configs -> manifest -> Jinja templates -> build/generated/<arch>/.

``python -m generator --help`` documents the command line. The pieces:

- ``configs``: the frozen ``KernelConfig`` dataclass (its ``name`` is the only source of
  kernel names) and the arch table.
- ``manifest``: which configs to emit (validated, deduplicated, culls logged), levels.
- ``dispatch``: M-bucket rules (built-in default or a tuning table), validated in Python.
- ``render``: the Jinja environment, ``write_if_changed`` and ``emit``.
"""

from .configs import ARCHS, ConfigError, KernelConfig
from .dispatch import DispatchRule
from .manifest import Manifest, default_manifest
from .render import emit, write_if_changed

__all__ = ["ARCHS", "ConfigError", "DispatchRule", "KernelConfig", "Manifest", "default_manifest",
           "emit", "write_if_changed"]
