"""Every relative link in the project's Markdown (README.md, docs/, the model cards) reaches a file that
exists, and every `#anchor` a heading of the file it names, with GitHub's heading ids (lowercased;
characters other than letters, digits, spaces, hyphens and underscores dropped; spaces turned into
hyphens; a repeated id numbered -1, -2, …). Links to other sites are not fetched."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("checkpoints/*/README.md")])
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the file outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((n, re.sub(r"`[^`]*`", lambda m: "`" + "x" * (len(m.group()) - 2) + "`", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's id for a heading's text."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if seen[s] == 0 else f"{s}-{seen[s]}")
            seen[s] += 1
    return out


def test_the_slug_is_githubs():
    assert slug("Prefill (`bench.prefill`): prompt ingestion, old against new") == (
        "prefill-benchprefill-prompt-ingestion-old-against-new"
    )
    assert slug("Step, batch ≥ 64 — 50 %") == "step-batch--64--50-"


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code, a link whose text wraps onto the next line too
    (`[batches past 256` / `rows](#…)`: three such links were never checked)."""
    lines = prose(path)
    out = [(n, target) for n, line in lines for target in LINK.findall(line)]
    for (n, line), (m, after) in zip(lines, lines[1:]):
        if m == n + 1:
            alone = LINK.findall(line) + LINK.findall(after)
            out += [(n, target) for target in LINK.findall(f"{line} {after}") if target not in alone]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for n, target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …: another site
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{doc.name}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{doc.name}:{n}: {target} (no such heading)")
    assert broken == [], "\n".join(broken)


def test_the_server_pages_file_table_names_every_module_once():
    """docs/server.md's file table: each server/ module (and routes/, static/) in exactly one row (auth.py
    had two rows, with different words)."""
    rows = [line for line in (ROOT / "docs" / "server.md").read_text().splitlines() if line.startswith("| `")]
    named = Counter(name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1]))
    assert [name for name, n in named.items() if n > 1] == []
    modules = {p.name for p in (ROOT / "server").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert modules | {"routes/", "static/"} == set(named)
