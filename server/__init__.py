"""Streaming inference server for S4 models: FastAPI routes, one engine thread per model."""

from server.app import create_app
from server.config import Settings

__all__ = ["Settings", "create_app"]
