"""`python -m models generate` end to end: a subprocess on the shipped SmolLM2-135M, on CPU
(a few seconds for a handful of tokens), as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENS_PER_SECOND = re.compile(r"^(\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s", re.MULTILINE)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # this checkout first on the path, ahead of any installed atom-kernels
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "models", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_generate_prints_text_and_tokens_per_second(smollm2_gguf_path):  # the fixture skips without the model
    prompt = "The capital of France is"
    done = run_cli("generate", "--device", "cpu", "--max-new-tokens", "4", prompt)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if prompt in line)
    assert line.startswith("[") and line.split(prompt, 1)[1].strip(), done.stdout  # the model added text
    rate = TOKENS_PER_SECOND.search(done.stdout)
    assert rate, f"no tokens/s line in:\n{done.stdout}"
    assert 1 <= int(rate.group(1)) <= 4 and float(rate.group(2)) > 0


def test_generate_without_a_prompt_fails_with_a_clear_error():
    done = run_cli("generate", "--device", "cpu")
    assert done.returncode == 2 and "give at least one prompt" in done.stderr
