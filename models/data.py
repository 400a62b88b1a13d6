"""Evaluation and calibration text: where it lives and how it is split.

Location: ``--data-dir`` flag, else the ATOM_DATA_DIR environment variable, else
``../shared/data`` next to the repository. Nothing is downloaded.

WikiText-2 protocol (GPTQ / Atom): the test split joined with "\\n\\n"
(``wikitext-2-raw-test.joined.txt``), tokenized once, cut into non-overlapping windows of
``seqlen`` tokens (remainder dropped). We have only the test split, so calibration uses its
*last* ``calib_samples * seqlen`` tokens and perplexity is computed on the full windows before
them: the calibration slice is never evaluated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
WIKITEXT_FILE = "wikitext-2-raw-test.joined.txt"
ZEROSHOT_DIR = "zeroshot"


class DataNotFound(FileNotFoundError):
    pass


def data_dir(explicit: str | Path | None = None) -> Path:
    d = Path(explicit or os.environ.get("ATOM_DATA_DIR") or DEFAULT_DATA_DIR)
    if not d.is_dir():
        raise DataNotFound(f"evaluation data directory not found: {d} (pass --data-dir or set ATOM_DATA_DIR; "
                           f"it must hold {WIKITEXT_FILE} and {ZEROSHOT_DIR}/)")
    return d


def data_file(name: str, explicit_dir: str | Path | None = None) -> Path:
    path = data_dir(explicit_dir) / name
    if not path.is_file():
        raise DataNotFound(f"evaluation data file not found: {path}")
    return path


def wikitext_ids(tokenizer, explicit_dir: str | Path | None = None) -> torch.Tensor:
    """The whole joined WikiText-2 test split as one 1-D LongTensor of token ids."""
    text = data_file(WIKITEXT_FILE, explicit_dir).read_text(encoding="utf-8")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


@dataclass(frozen=True)
class TextSplit:
    eval_windows: torch.Tensor    # [n_eval, seqlen]
    calib_windows: torch.Tensor   # [calib_samples, seqlen]
    total_tokens: int

    def protocol(self) -> dict:
        n_eval, seqlen = self.eval_windows.shape
        return {
            "text": WIKITEXT_FILE,
            "total_tokens": self.total_tokens,
            "seqlen": seqlen,
            "eval_windows_available": n_eval,
            "eval_tokens": f"[0, {n_eval * seqlen})",
            "calibration_tokens": f"[{self.total_tokens - self.calib_windows.numel()}, {self.total_tokens}) "
                                  f"= last {self.calib_windows.shape[0]} x {seqlen}",
        }


def split_text(ids: torch.Tensor, seqlen: int = 2048, calib_samples: int = 16) -> TextSplit:
    n_calib = calib_samples * seqlen
    if ids.numel() < n_calib + seqlen:
        raise ValueError(f"text of {ids.numel()} tokens is too short for {calib_samples} calibration "
                         f"windows and one evaluation window of {seqlen}")
    calib = ids[ids.numel() - n_calib:].reshape(calib_samples, seqlen)
    rest = ids[: ids.numel() - n_calib]
    n_eval = rest.numel() // seqlen
    return TextSplit(rest[: n_eval * seqlen].reshape(n_eval, seqlen), calib, ids.numel())
