"""Every ```python block of README.md runs as written: each in a fresh temporary directory, in
its own ``python`` subprocess (bounded in time), making its own tiny data. Shell commands go in
```bash blocks, which are not run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 300  # seconds for one block, on a loaded 2-core machine


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the first code line, code)`` of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
        blocks.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text())


def first_line(code: str) -> str:
    return next((line.strip() for line in code.splitlines() if line.strip()), "")


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4
    assert python_blocks("```python\nx = 1\n```\n```bash\nls\n```\n") == [(2, "x = 1\n")]


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_readme_block_runs_as_written(line: int, code: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    script = tmp_path / "block.py"
    script.write_text(code)
    name = f"README.md block at line {line} ({first_line(code)!r})"
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} did not finish within {TIMEOUT} s")
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
    assert done.returncode == 0, f"{name} failed with exit status {done.returncode}:\n{tail}"
