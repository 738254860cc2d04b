"""CI smoke test of the load test: the locustfile's four user classes run headless for a few seconds
against a tiny-model server and every class gets its requests through (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

from loadtest.run import read_stats, summarize, text_rows

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("HttpGenerateUser", "SseUser", "WsTextUser", "WsAudioUser")


def test_locust_users_of_every_class_get_their_requests_through(server, tmp_path):
    prefix, latency = tmp_path / "smoke", tmp_path / "smoke.latency.json"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "-u",
        "8",
        "-r",
        "8",
        "-t",
        "5s",
        "--host",
        server.url,
        "--csv",
        str(prefix),
        "--only-summary",
        "--text-model",
        "tiny-text",
        "--audio-model",
        "tiny-audio",
        "--new-tokens",
        "16",
        "--audio-samples",
        "200",
        "--turns",
        "2",
        "--latency-out",
        str(latency),
        *CLASSES,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]  # locust exits 1 when any request failed

    rows = {(r["Type"], r["Name"]): r for r in read_stats(Path(f"{prefix}_stats.csv"))}
    for kind in ("HTTP", "SSE", "WS", "WS-audio"):
        assert int(rows[(kind, "generate")]["Request Count"]) > 0, kind
        assert int(rows[(kind, "generate")]["Failure Count"]) == 0, kind
    for kind in ("SSE", "WS", "WS-audio"):  # streaming users also report time to first token and gaps
        assert int(rows[(kind, "ttft")]["Request Count"]) > 0, kind
        assert int(rows[(kind, "itl")]["Request Count"]) > 0, kind
    assert rows[("", "Aggregated")]["Failure Count"] == "0"

    exact = json.loads(latency.read_text())
    assert exact["failures"] == {} and all(exact["tokens"][k] > 0 for k in ("HTTP", "SSE", "WS", "WS-audio"))
    assert exact["audio_turns"] and all(
        t["sample_rate"] == 8000 and t["samples"] == 200 for t in exact["audio_turns"]
    )

    level = summarize(prefix, latency)  # what loadtest.run reports per level
    assert level["error_rate"] == 0 and level["text_tokens_per_s"] > 0 and level["audio"]["rtf_total"] > 0
    level.update(users=8, load_avg_1min_before=0.0)
    assert len(text_rows([level], ("HTTP", "SSE", "WS", "WS-audio"))) == 4


def test_the_audio_goal_needs_every_turn_in_real_time_as_its_label_says():
    """The report's line "audio real time (every turn RTF ≥ 1) for ≥ 4 streams" counted a sweep point
    as met when each stream's average RTF was ≥ 1, though one of its turns ran at 0.92 (a fresh-user
    trial's run): it now takes the slowest turn."""
    from loadtest.run import goals

    def point(users, per_turn_min, per_stream_min):
        audio = {"rtf_per_turn_min": per_turn_min, "rtf_per_stream_min": per_stream_min,
                 "rtf_total": users * per_stream_min}  # fmt: skip
        return {"users": users, "audio": audio}

    line = "audio real time (every turn RTF ≥ 1) for ≥ 4 streams"
    data = {"scenarios": {"audio": [point(2, 1.3, 1.4), point(4, 0.92, 1.07)]}}
    assert goals(data)[line].startswith("2 streams in real time (not met)")
    data = {"scenarios": {"audio": [point(2, 1.3, 1.4), point(4, 1.01, 1.07)]}}
    assert goals(data)[line].startswith("4 streams in real time (met)")
