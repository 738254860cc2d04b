"""The README's curl and Python examples, run verbatim against a real server, so they cannot rot.

A fenced ```bash or ```python block right after the line `<!-- tested: tests/test_readme.py ... -->`
is run as it stands: bash blocks by `bash -euo pipefail` in an empty folder, python blocks by this
test's Python. The server (uvicorn on a free port) serves tiny models under the README's model ids,
text-shakespeare and audio-digits, with every limit at its default. The examples say
localhost:8000 / 127.0.0.1:8000; that port is mapped to the test server's without touching their text:
curl reads a ~/.curlrc (`connect-to`, and `fail-with-body` so that an HTTP error fails the block) and
Python a sitecustomize that sends a socket's connect to 127.0.0.1:8000 to the test server. Every
README block that talks to a server (curl, websockets.connect, OpenAI) must carry the marker."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest
import torch
from server_support import ServerThread, make_text_model

from model import ModelConfig, build, save
from server import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "<!-- tested: tests/test_readme.py"
TALKS_TO_A_SERVER = re.compile(r"(^|\$\(|\|)\s*curl\s|websockets\.connect\(|OpenAI\(", re.M)  # a curl command
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(page: Path = README) -> list[tuple[int, str, str, bool]]:
    """Every fenced block of the README (or another page): (first line number, language, code, marked as
    tested)."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        marked = i > 0 and lines[i - 1].startswith(MARK)
        out.append((i + 1, m.group(1), "\n".join(lines[i + 1 : j]) + "\n", marked))
        i = j + 1
    return out


TESTED = [(line, lang, code) for line, lang, code, marked in readme_blocks() if marked]


def test_every_example_that_talks_to_a_server_is_tested():
    untested = [line for line, lang, code, marked in readme_blocks()
                if lang in ("bash", "python") and TALKS_TO_A_SERVER.search(code) and not marked]  # fmt: skip
    assert untested == [], f"README blocks at lines {untested} call a server but are not marked {MARK!r}"


def test_no_page_of_docs_holds_a_server_example_this_test_would_not_run():
    """Only the README's blocks are run: an example that talks to a server belongs there, marked."""
    found = [f"{page.name}:{line}" for page in sorted((ROOT / "docs").glob("*.md"))
             for line, lang, code, _ in readme_blocks(page)
             if lang in ("bash", "python", "sh", "") and TALKS_TO_A_SERVER.search(code)]  # fmt: skip
    assert found == [], f"docs/ blocks {found} call a server: move them to the README, marked {MARK!r}"
    assert {lang for _, lang, _ in TESTED} == {"bash", "python"} and len(TESTED) >= 3


# A command that runs the project's code (`-m model…`, `-m server`, `-m bench…`, `-m loadtest`, or one of its
# scripts) by the bare name `python`/`python3`: in a fresh clone that is the system's Python, without torch or
# the project (`No module named 'torch'`), since `make serve` installs them into .venv and activates nothing.
BARE_PYTHON = re.compile(
    r"(?:^|[;&|(])\s*(?:\w+=\S*\s+)*(?:(?:nice(?:\s+-n\s*-?\d+)?|time|exec)\s+)*"
    r"(python3?\s+(?:-m\s+(?:model|server|bench|loadtest)\b|(?:model|server|bench|loadtest|scripts)/)\S*)",
    re.M,
)


def test_every_command_example_runs_the_projects_code_with_the_venvs_python():
    """A fenced shell block is copied as it stands: where it runs the project's code, it names the venv's
    interpreter (`.venv/bin/python`), as the README's other blocks do; `python -m model.train …` copied
    from the SaShiMi section into a fresh clone after `make serve` failed with `No module named 'torch'`."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    bare = [f"{page.name}:{line}: {m.group(1)}"
            for page in pages for line, lang, code, _ in readme_blocks(page) if lang in ("bash", "sh")
            for m in BARE_PYTHON.finditer(code)]  # fmt: skip
    assert bare == [], "run by the system's python, not .venv/bin/python:\n" + "\n".join(bare)


def test_the_scripts_usage_lines_run_them_with_the_venvs_python():
    """A script's docstring is its --help, which a user copies as the README's blocks are copied: its usage
    lines name the venv's interpreter. `python scripts/ws_generate.py …` (the README's "the same as a
    command"), copied from its --help into a fresh clone after `make serve`: "No module named
    'websockets'"."""
    bare = [f"scripts/{page.name}: {m.group(1)}" for page in sorted((ROOT / "scripts").glob("*.py"))
            for m in BARE_PYTHON.finditer(ast.get_docstring(ast.parse(page.read_text())) or "")]  # fmt: skip
    assert bare == [], "run by the system's python, not .venv/bin/python:\n" + "\n".join(bare)


def _make_serve(tmp_path: Path) -> tuple[subprocess.Popen, Path, int]:
    """`make serve` with a stand-in venv whose python records the signals it gets (and installs nothing: its
    .installed is newer than pyproject.toml). Returns make, the record and the stand-in server's PID."""
    venv, record = tmp_path / "venv", tmp_path / "signals"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/bash\necho $$ > {record}.pid\n"
                      f"trap 'echo TERM >> {record}; exit 0' TERM\ntrap 'echo INT >> {record}; exit 0' INT\n"
                      "while :; do sleep 0.05; done\n")  # fmt: skip
    python.chmod(0o755)
    (venv / "bin" / ".installed").touch()
    make = subprocess.Popen(["make", "-s", "-C", str(ROOT), "serve", f"VENV={venv}"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (Path(f"{record}.pid").exists() and Path(f"{record}.pid").read_text().strip()):
        assert make.poll() is None and time.monotonic() < deadline, "make serve did not start its server"
        time.sleep(0.05)
    time.sleep(0.3)  # the traps are set
    return make, record, int(Path(f"{record}.pid").read_text())


def _signals(record: Path) -> list[str]:
    return record.read_text().split() if record.exists() else []


def test_make_serve_stops_on_ctrl_c_and_on_a_sigterm_to_make_not_on_a_sigint_to_make_alone(tmp_path):
    """What The two commands says of stopping `make serve`: Ctrl-C (the terminal signals make's process
    group) reaches the server, and so does a SIGTERM to make, which GNU make passes on to the recipe it runs
    (the README said a signal to make itself was not passed on); a SIGINT to make alone is not: make waits,
    and the server goes on serving until it is signalled itself."""
    make, record, server = _make_serve(tmp_path / "ctrl-c")
    os.killpg(make.pid, signal.SIGINT)
    assert make.wait(timeout=30) != 0 and _signals(record) == ["INT"]

    make, record, server = _make_serve(tmp_path / "term")
    make.send_signal(signal.SIGTERM)
    assert make.wait(timeout=30) != 0 and _signals(record) == ["TERM"]

    make, record, server = _make_serve(tmp_path / "int")
    make.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert make.poll() is None and _signals(record) == [], "a SIGINT to make alone reached the server"
    os.kill(server, signal.SIGTERM)
    make.wait(timeout=30)
    assert _signals(record) == ["TERM"]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-checkpoints")
    save(make_text_model(), root / "text-shakespeare")
    torch.manual_seed(1)  # audio-digits is a SaShiMi: so is its stand-in
    save(build(ModelConfig(arch="sashimi", vocab_size=256, d_model=16, n_layers=1, d_state=16, l_max=256,
                           pool=[4, 4], cauchy_backend="torch", modality="audio", sample_rate=8000)),
         root / "audio-digits")  # fmt: skip
    # the shipped text-shakespeare's chat template (the README's chat example uses it)
    shipped = json.loads((ROOT / "checkpoints" / "text-shakespeare" / "config.json").read_text())
    config = root / "text-shakespeare" / "config.json"
    meta = json.loads(config.read_text())
    meta.update({k: shipped[k] for k in ("chat_template", "chat_stop")})
    config.write_text(json.dumps(meta))
    s = ServerThread(Settings(checkpoints=[str(root / "text-shakespeare"), str(root / "audio-digits")]))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def sandbox(readme_server, tmp_path) -> dict:
    """An empty working folder, and an environment whose port 8000 is the test server's."""
    home, site, work = tmp_path / "home", tmp_path / "site", tmp_path / "work"
    for d in (home, site, work):
        d.mkdir()
    (work / "checkpoints").mkdir()  # the examples that load a shipped checkpoint name it from the repository
    (work / "checkpoints" / "text-shakespeare").symlink_to(ROOT / "checkpoints" / "text-shakespeare")
    port = readme_server.port
    (home / ".curlrc").write_text(
        f"connect-to = localhost:8000:127.0.0.1:{port}\n"
        f"connect-to = 127.0.0.1:8000:127.0.0.1:{port}\n"
        "fail-with-body\nmax-time = 120\n"
    )
    (site / "sitecustomize.py").write_text(
        "import socket\n"
        "_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex\n"
        "def _mapped(address):\n"
        "    if isinstance(address, tuple) and address[:2] in (('127.0.0.1', 8000), ('::1', 8000)):\n"
        f"        return ('127.0.0.1', {port})\n"
        "    return address\n"
        "socket.socket.connect = lambda self, address: _connect(self, _mapped(address))\n"
        "socket.socket.connect_ex = lambda self, address: _connect_ex(self, _mapped(address))\n"
    )
    env = {"PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent), "HOME": str(home),
           "PYTHONPATH": str(site), "LANG": "C.UTF-8"}  # fmt: skip
    return {"cwd": work, "env": env}


def run_block(lang: str, code: str, sandbox: dict) -> subprocess.CompletedProcess:
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=sandbox["cwd"], env=sandbox["env"], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def wav_frames(path: Path) -> tuple[int, int]:
    with wave.open(io.BytesIO(path.read_bytes())) as w:
        return w.getframerate(), w.getnframes()


@pytest.mark.parametrize("line,lang,code", TESTED, ids=[f"README.md:{t[0]}-{t[1]}" for t in TESTED])
def test_readme_example_runs_verbatim(line, lang, code, sandbox):
    for tool in ("curl",) if lang == "bash" else ():
        assert shutil.which(tool), f"{tool} is needed by the README's examples (make sysdeps installs it)"
    r = run_block(lang, code, sandbox)
    assert r.returncode == 0, f"README.md:{line} ({lang}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out, work = r.stdout, sandbox["cwd"]
    assert '"error"' not in out, out[-2000:]
    # what each kind of example promises
    if "/readyz" in code:
        assert '"ready":true' in out.replace(" ", "")
    if '"stream": true' in code:
        assert 'data: {"type": "done"' in out
    if "websockets.connect" in code:
        assert "'type': 'done'" in out and "'finish_reason': 'length'" in out
    for name in re.findall(r"> (\w+\.wav)", code):  # every WAV an example writes: 1 s at 8 kHz
        assert wav_frames(work / name) == (8000, 8000), name
    if "prompt_tokens_details" in code:  # the prefix cache's example: a miss, then the document's chunks
        usages = [ast.literal_eval(line) for line in out.splitlines()]
        assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 1536], out
    if "s4state" in code:  # exported, imported as a new session, continued, then both deleted
        assert (work / "juliet.s4state").read_bytes()[:4] and out.splitlines()[-2:] == ["204", "204"], out
        assert '"finish_reason":"length"' in out.splitlines()[-3].replace(" ", ""), out


def readme_metrics_table() -> dict[str, tuple[str, set[str]]]:
    """The README's Metrics table: {metric as queried: (type, labels)}."""
    parts = README.read_text().split("\n### Metrics\n", 1)
    section = parts[1].split("\n#", 1)[0] if len(parts) == 2 else ""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            name, kind, labels = (cell.strip() for cell in line.strip("|").split("|")[:3])
            rows[name.strip("`")] = (kind, set(re.findall(r"`(\w+)`", labels)))
    return rows


def test_the_readmes_metrics_table_names_every_metric_the_server_exports(server):
    """Every metric family a server's /metrics exports (the main test server: a text and an audio model;
    plus the session store's gauges, exported only with a store) is a row of the README's Metrics table,
    with its type and labels, and the table names nothing that is not exported: it cannot go stale."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    store = Metrics()
    store.add_store_gauges(lambda: 0)
    assert httpx.get(server.url + "/v1/models").status_code == 200  # (the http_* series: at a request)
    exported = {}
    for exposition in (httpx.get(server.url + "/metrics").text, store.render()[0].decode()):
        for f in text_string_to_metric_families(exposition):
            labels = {k for x in f.samples for k in x.labels if k not in ("le", "quantile")}
            exported.setdefault(f.name + ("_total" if f.type == "counter" else ""), (f.type, labels))
    assert {"s4_session_store_up", "s4_session_store_backlog", "http_requests_total"} <= exported.keys()
    table = readme_metrics_table()
    assert sorted(exported.keys() - table.keys()) == [], "exported, not in the README's Metrics table"
    assert sorted(table.keys() - exported.keys()) == [], "in the README's Metrics table, not exported"
    assert {name: table[name] for name in exported} == exported
