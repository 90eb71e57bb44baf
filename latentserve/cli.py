"""``latentserve``: the one command-line entry point.

Each area registers its own subcommands (``register(subparsers)``) from a module that
imports nothing heavy at import time, so ``latentserve serve`` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (module, what it adds) in the order ``--help`` lists them.
AREAS = (
    "latentserve.export.cli",    # train, export
    "latentserve.export.import_cli",  # import (ONNX graphs made elsewhere)
    "latentserve.service.cli.models",  # models
    "latentserve.worker.cli",  # worker (the Redis job consumer)
    "latentserve.service.cli.inference",   # serve, compress, reconstruct, sample, demo
    "latentserve.service.cli.jobs",  # job submit|watch|fetch|cancel|list
    "latentserve.service.cli.tokens",  # token new|hash (bearer tokens for serve)
    "latentserve.eval.cli",      # eval
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentserve",
        description="Serve AE / VAE / VQ-VAE image models as compact latent codes.")
    from latentserve import __version__
    parser.add_argument("--version", action="version", version=f"latentserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an absent area
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from latentserve.errors import LatentServeError

    try:
        return int(args.func(args) or 0)
    except LatentServeError as exc:
        print(f"latentserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
