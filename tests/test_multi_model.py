"""Several models in one server (a helper's audit): a text and an audio model, and one checkpoint served
under two ids in two dtypes (`NAME=PATH`, `S4_MODEL_DTYPES`). Each model is named as itself wherever the
server speaks of it (log lines, errors), sessions stay on their model unless moved on purpose, and one
model's load never changes another's output."""

from __future__ import annotations

import logging

from server.config import Settings
from server.metrics import Metrics
from server.registry import load_models
from server.sessions import SessionTable

TEXT = "tiny-text"
BF16 = "tiny-text-bf16"  # the same folder as TEXT, served in bfloat16


def test_load_time_log_lines_name_each_model_id_not_its_folder(model_dirs, caplog):
    """One folder under two ids: every load-time line about a model names its id. The lines of
    S4_COMPILE_STEP, S4_STATE_DTYPE and the CUDA graphs named the folder (`path.name`), so both models'
    lines said tiny-text, and the bfloat16 model's were not to be told from the float32 one's."""
    settings = Settings(
        checkpoints=[str(model_dirs["text"]), f"{BF16}={model_dirs['text']}"],
        model_dtypes=[f"{BF16}=bfloat16"],
        state_dtype="float16",  # (ignored on CPU: one line per model says so)
        compile_step=True,  # (likewise)
        max_sessions=2,
        device="cpu",
    )
    with caplog.at_level(logging.INFO, logger="server.models"):
        models, failed = load_models(settings, SessionTable(), Metrics())
    assert set(models) == {TEXT, BF16} and not failed
    for model_id in (TEXT, BF16):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"model {model_id}: ")]
        assert any("S4_STATE_DTYPE=float16 ignored on CPU" in line for line in lines), (model_id, lines)
        assert any("S4_COMPILE_STEP ignored" in line for line in lines), (model_id, lines)
