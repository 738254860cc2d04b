"""Streaming inference server for S4 models: FastAPI routes, one engine thread per model.

`create_app` and `Settings` are imported on first use (PEP 562), so `python -m server` reaches its own
signal handlers before torch is imported (a SIGTERM in that first second would otherwise kill it silently).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import create_app
    from server.config import Settings

__all__ = ["Settings", "create_app"]
_WHERE = {"create_app": "server.app", "Settings": "server.config"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
