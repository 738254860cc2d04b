"""`python -m server [--flags]`: serve the configured checkpoints with uvicorn.

Settings come from S4_* environment variables, then these flags (one per setting; see --help).
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: on a shared or small CPU spinning threads stall the
# engine (a tiny model's step goes from 0.5 ms to 20 ms). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import typing  # noqa: E402

import uvicorn  # noqa: E402

from server.app import create_app  # noqa: E402
from server.config import Settings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        if typing.get_origin(ann) is typing.Annotated:
            ann = typing.get_args(ann)[0]
        help_ = f"{field.description} (env S4_{name.upper()})"
        if typing.get_origin(ann) is list:
            parser.add_argument(flag, nargs="+", dest=name, default=None, metavar="DIR", help=help_)
        elif typing.get_origin(ann) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(ann), dest=name, default=None, help=help_)
        else:
            parser.add_argument(flag, type=ann, dest=name, default=None, help=help_)
    args = parser.parse_args(argv)
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.ws_max_frame_bytes,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )


if __name__ == "__main__":
    main()
