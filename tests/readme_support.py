"""The README's fenced blocks after a `<!-- tested: ... -->` marker, for tests that run them verbatim."""

from __future__ import annotations

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
