"""`scripts/reliability.py soak` in small (CI): a short mixed load on a tiny model, and the script's
own checks come back clean: no error, every slot free once the sessions expired, exit 0."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_soak_ends_with_no_error_and_no_slot_in_use(model_dirs, tmp_path):
    cmd = [sys.executable, "scripts/reliability.py", "soak", "--checkpoint", str(model_dirs["text"]),
           "--duration-s", "6", "--sample-s", "2", "--warmup-s", "0", "--ttl-s", "1",
           "--ws-users", "2", "--http-users", "2", "--out", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["errors"] == {} and result["requests_ok"] > 20
    assert result["slots_in_use_at_end"] == 0 and result["queue_depth_at_end"] == 0
    assert result["exit_code"] == 0 and len(result["samples"]) >= 2
    assert result["rss_mib"]["end"] > 0
