"""The README's fenced blocks after a `<!-- tested: ... -->` marker, for tests that run them verbatim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks_after(marker: str, n: int) -> list[tuple[str, str]]:
    """The first `n` fenced blocks after the README line that starts with `marker`, each as (language,
    code)."""
    lines = README.read_text().splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(marker))
    blocks = []
    while len(blocks) < n:
        i = next(k for k in range(i, len(lines)) if lines[k].startswith("```") and len(lines[k]) > 3)
        j = next(k for k in range(i + 1, len(lines)) if lines[k] == "```")
        blocks.append((lines[i][3:], "\n".join(lines[i + 1 : j])))
        i = j + 1
    return blocks


def run_convert_then_python(marker: str, folder: str, to: Path) -> bytes:
    """Run the two blocks after `marker` (a bash conversion, then a python program) verbatim from the
    project root, the README's output `folder` moved to `to` and `.venv/bin/python` this interpreter; each
    must exit 0. Returns the program's stdout (bytes)."""
    (bash, convert), (python, generate) = [(lang, code.replace(folder, str(to)))
                                           for lang, code in blocks_after(marker, 2)]  # fmt: skip
    assert (bash, python) == ("bash", "python")
    root = README.parent
    convert = convert.replace(".venv/bin/python", sys.executable)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", convert], cwd=root, capture_output=True, text=True,
                       timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", generate], cwd=root, capture_output=True, timeout=600,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout
