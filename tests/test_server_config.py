"""Settings at their edges, refused before the server listens with one line naming the env var and the
flag: values past any sensible bound, flags and env vars read alike, variables that are no setting,
checkpoint entries that cannot all be served."""

import os
import re
from pathlib import Path

import pytest

from server.config import Settings

NUMERIC = [name for name, f in Settings.model_fields.items() if f.annotation in (int, float)]
# the network timeouts and TTLs: a tiny positive value made every request fail (S4_HEADER_TIMEOUT_S=1e-9:
# every connection dropped without an answer; S4_BODY_TIMEOUT_S=1e-9: every POST 408;
# S4_SESSION_TTL_S=1e-9: a WebSocket generate's new session gone before its turn, a 404)
TIMEOUTS = ["header_timeout_s", "body_timeout_s", "ws_handshake_timeout_s", "send_timeout_s",
            "keep_alive_timeout_s", "session_store_flush_timeout_s", "session_ttl_s"]  # fmt: skip


def bound(name: str, kind) -> float | None:
    return next((getattr(m, kind) for m in Settings.model_fields[name].metadata if hasattr(m, kind)), None)


def refusal(monkeypatch, **env: str) -> str:
    """`python -m server` with these S4_* variables, run in this process up to its exit: the exit's
    message. Nothing may be checked or loaded: the settings are refused first."""
    import server.__main__ as main_module

    monkeypatch.setattr(main_module, "preflight", lambda *a: pytest.fail("the settings were taken"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stop:
        main_module.main([])
    return str(stop.value.code)


def assert_one_short_line(message: str, name: str) -> None:
    flag = "--" + name.replace("_", "-")
    assert message.startswith(f"not serving: invalid settings: S4_{name.upper()} ({flag}): "), message
    assert "\n" not in message and len(message) < 400, message
    assert not re.search(r"[0-9]{21}", message), message  # no value of hundreds of digits echoed


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_setting_has_an_upper_bound_refused_by_name_before_listening(name, monkeypatch):
    """S4_TORCH_THREADS=100000 crashed the process after "Uvicorn running" (torch's thread pool), 10**18
    was a traceback ("Overflow when unpacking long") and "loading the models failed" naming no setting;
    S4_VERIFY_TOLERANCE=1e18 turned verification off; S4_MAX_CONNECTIONS=10**400 started with a warning
    holding a 400-digit number. Every number now has a ceiling, checked before anything loads."""
    upper = bound(name, "le")
    assert upper is not None, f"{name} has no upper bound"
    huge = str(10**400) if Settings.model_fields[name].annotation is int else "1e300"
    assert_one_short_line(refusal(monkeypatch, **{f"S4_{name.upper()}": huge}), name)


@pytest.mark.parametrize("value", ["1025", "100000", str(10**18)])
def test_torch_threads_past_1024_are_refused(value, monkeypatch):
    message = refusal(monkeypatch, S4_TORCH_THREADS=value)
    assert_one_short_line(message, "torch_threads")
    assert "less than or equal to 1024" in message
    assert Settings(torch_threads=1024, prefill_threads=1024).torch_threads == 1024


def test_a_verify_tolerance_that_would_turn_verification_off_is_refused(monkeypatch):
    """1e-2 passes (500x the shipped layers' worst float32 error, 2e-5); 1e18 accepted any form."""
    assert Settings(verify_tolerance=1e-2).verify_tolerance == 1e-2
    message = refusal(monkeypatch, S4_VERIFY_TOLERANCE="0.011")
    assert_one_short_line(message, "verify_tolerance")


@pytest.mark.parametrize("name", TIMEOUTS)
def test_network_timeouts_and_ttls_have_a_floor(name, monkeypatch):
    floor = bound(name, "ge")
    assert floor is not None and floor >= 0.1, (name, floor)
    assert getattr(Settings(**{name: floor}), name) == floor
    assert_one_short_line(refusal(monkeypatch, **{f"S4_{name.upper()}": "1e-9"}), name)


def test_a_session_ttl_is_at_least_a_second(monkeypatch):
    assert bound("session_ttl_s", "ge") == 1
    assert_one_short_line(refusal(monkeypatch, S4_SESSION_TTL_S="0.5"), "session_ttl_s")


def test_the_store_write_wait_is_0_or_at_least_a_tenth_of_a_second(monkeypatch):
    """0 answers at once; a wait shorter than any store's round trip answered every change late (a
    warning each) and every delete 503."""
    assert Settings(session_store_write_wait_s=0).session_store_write_wait_s == 0
    assert Settings(session_store_write_wait_s=0.1).session_store_write_wait_s == 0.1
    message = refusal(monkeypatch, S4_SESSION_STORE_WRITE_WAIT_S="1e-9")
    assert_one_short_line(message, "session_store_write_wait_s")
    assert "must be 0 (answer at once) or at least 0.1 s" in message


def test_port_0_is_refused(monkeypatch):
    """S4_PORT=0 listened on a port the OS picked, said only in uvicorn's line: no client, probe or
    proxy configured for the server could reach it."""
    message = refusal(monkeypatch, S4_PORT="0")
    assert_one_short_line(message, "port")
    assert "the OS would pick the port" in message, message  # (its reason; it said ">= 1" alone)
    assert Settings(port=1).port == 1
    with pytest.raises(ValueError, match="port"):
        Settings(port=65536)


def outcome(make) -> object:
    """The settings `make()` builds, or the settings its refusal names."""
    from pydantic import ValidationError

    try:
        return make().model_dump()
    except ValidationError as exc:
        return ("refused", sorted(str(e["loc"]) for e in exc.errors()))
    except SystemExit as exc:  # argparse's own refusal: a flag treated otherwise than its variable
        return ("argparse", exc.code)


SCALARS = [name for name, f in Settings.model_fields.items() if "list" not in str(f.annotation)]


@pytest.mark.parametrize(
    "value", ["DEBUG", "JSON", "Text", "٣", "١e-3", "x", "3", "0.5", "TRUE", " 7 ", "-1e-3", "-k3y", "-"]
)
def test_a_flag_takes_and_refuses_what_its_variable_does(value, monkeypatch):
    """`--log-level DEBUG` and `--log-format JSON` were argparse errors while S4_LOG_LEVEL=DEBUG was taken
    (lowercased); `--max-sessions ٣` (Arabic-Indic digits) was taken by argparse's int() while
    S4_MAX_SESSIONS=٣ was refused. Each flag's value is now parsed by Settings, as its variable's is; a
    value starting with '-' too (`--verify-tolerance -1e-3`, `--api-keys-file -k3y` were argparse's usage
    errors, exit 2, as if the value were an option)."""
    from server.__main__ import parse_args

    for key in [k for k in os.environ if k.upper().startswith("S4_")]:
        monkeypatch.delenv(key)
    for name in SCALARS:
        flag, var = "--" + name.replace("_", "-"), f"S4_{name.upper()}"
        by_flag = outcome(lambda: parse_args([flag, value]))  # noqa: B023
        monkeypatch.setenv(var, value)
        by_env = outcome(lambda: parse_args([]))
        monkeypatch.delenv(var)
        assert by_flag == by_env, (name, value, by_flag, by_env)


def test_a_key_starting_with_a_dash_is_taken_by_the_flag_as_by_the_variable(monkeypatch):
    """A URL-safe base64 key (`secrets.token_urlsafe`) starts with '-' one time in 64: `--api-keys -k3y…`
    stopped the server with argparse's "expected at least one argument", and `--api-keys KEY1 -k3y…` with
    "unrecognized arguments", while S4_API_KEYS took both. Every value after a flag is the flag's, up to
    the next flag."""
    from server.__main__ import parse_args

    for key in [k for k in os.environ if k.upper().startswith("S4_")]:
        monkeypatch.delenv(key)
    first, dashed = "k3y-0123456789abcdef", "-Xq9_0123456789abcdef"
    assert parse_args(["--api-keys", dashed]).api_keys == [dashed]
    taken = parse_args(["--api-keys", first, dashed, "--port", "8001", "--checkpoints", "-run", "x"])
    assert taken.api_keys == [first, dashed] and taken.port == 8001 and taken.checkpoints == ["-run", "x"]
    monkeypatch.setenv("S4_API_KEYS", f"{first},{dashed}")
    assert parse_args([]).api_keys == taken.api_keys
    assert parse_args(["--require-all-models", "--port", "8002"]).require_all_models  # (a bare flag: true)


def test_a_flag_of_the_wrong_type_is_refused_as_its_variable_is(monkeypatch):
    """`--port x` was argparse's usage error (exit 2), S4_PORT=x the server's one line (exit 1)."""
    import server.__main__ as main_module

    monkeypatch.setattr(main_module, "preflight", lambda *a: pytest.fail("the settings were taken"))
    for argv in (["--port", "x"], ["--max-sessions", "٣"], ["--log-level", "loud"]):
        with pytest.raises(SystemExit) as stop:
            main_module.main(argv)
        name = argv[0][2:].replace("-", "_")
        assert_one_short_line(str(stop.value.code), name)
    assert main_module.parse_args(["--log-level", "DEBUG", "--log-format", "JSON"]).log_format == "json"


def test_variables_that_are_no_setting_are_found_in_any_case(monkeypatch):
    """Settings reads its variables in any case (s4_max_sessions=9 is taken), but only S4_* names were
    checked for typos: s4_max_sesion=3 was ignored without a word. The other tools' variables are read in
    upper case only, so a lower-case one is named too."""
    from server.__main__ import unknown_env

    env = {"s4_max_sesion": "3", "S4_Max_Sesion": "3", "s4_max_sessions": "9", "S4_Port": "8001",
           "s4_cflags": "-O2", "S4_CFLAGS": "-O2", "S4_FUZZ_WS_FRAMES": "9", "s4x": "1"}  # fmt: skip
    assert unknown_env(env) == ["S4_Max_Sesion", "s4_cflags", "s4_max_sesion"]
    for key in [k for k in os.environ if k.upper().startswith("S4_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("s4_max_sessions", "9")
    assert Settings().max_sessions == 9  # (why a lower-case name is no less a setting)


T, A = "checkpoints/text-shakespeare", "checkpoints/audio-digits-s4"


@pytest.mark.parametrize(
    ("entries", "said"),
    [
        (f"{T},{T}", "model id 'text-shakespeare' is given twice"),
        (f"{T},./checkpoints//text-shakespeare/", "(the same checkpoint)"),
        (f"x={T},x={A}", "model id 'x' is given twice"),
        (f"text-shakespeare={A},{T}", "model id 'text-shakespeare' is given twice"),
        (f"bad name!={T}", "'bad name!' is not a model id"),
        (f"={T}", "'' is not a model id"),
        ("x=", "'x=' names no checkpoint after '='"),
        (".", "'.' gives no model id"),
    ],
)
def test_checkpoint_entries_that_cannot_all_be_served_stop_the_server_before_it_listens(
    entries, said, monkeypatch
):
    """Duplicates started a server whose /readyz listed the second entry under "failed" (with
    S4_REQUIRE_ALL_MODELS=1: 503 for ever); a NAME that is no id (`bad name!=PATH`, `=PATH`) or an empty
    PATH was read as a path ("no such file or folder: bad name!=..."). Each is one line naming
    S4_CHECKPOINTS now, before anything is read."""
    message = refusal(monkeypatch, S4_CHECKPOINTS=entries, S4_REQUIRE_ALL_MODELS="1")
    assert_one_short_line(message, "checkpoints")
    assert said in message, message


def test_one_checkpoint_under_two_names_and_a_path_with_a_slash_before_its_equals_sign_are_taken():
    from server.registry import parse_entry

    assert Settings(checkpoints=[f"x={T}", f"y={T}"]).checkpoints == [f"x={T}", f"y={T}"]  # two dtypes, say
    assert parse_entry("./run=3/x") == (None, Path("run=3/x"))
    assert parse_entry("mine=/x/y.ckpt")[0] == "mine"
