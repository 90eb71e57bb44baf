"""``latentserve token new NAME [--tokens FILE]``: make a bearer token for ``serve --auth-tokens``.

The token goes to stdout, once; only its SHA-256 goes into the tokens file. ``token hash
NAME`` turns a token read from stdin into its tokens-file line (for tokens made elsewhere).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from latentserve.errors import InvalidInput


def register(sub: Any) -> None:
    """Add ``token new`` and ``token hash``."""
    p = sub.add_parser("token", help="make bearer tokens for serve --auth-tokens",
                       description="Bearer tokens: the server keeps only their SHA-256.")
    tsub = p.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    new = tsub.add_parser("new", help="print a new token; add its hash to a tokens file")
    new.add_argument("name", metavar="NAME", help="the identity the token stands for "
                                                  "(jobs belong to it)")
    new.add_argument("--tokens", type=Path, metavar="FILE",
                     help="append the token's line to this tokens file (created mode 0600); "
                          "without it the line is printed to stderr")
    new.set_defaults(func=cmd_token)
    hashed = tsub.add_parser("hash", help="read a token on stdin, print its tokens-file line")
    hashed.add_argument("name", metavar="NAME")
    hashed.set_defaults(func=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    from latentserve.service.server.auth import check_name, new_token, parse_tokens, token_line

    check_name(args.name)
    if args.token_command == "hash":
        token = sys.stdin.readline().strip()
        if not token:
            raise InvalidInput("no token on stdin")
        print(token_line(args.name, token))
        return 0
    token = new_token()
    line = token_line(args.name, token)
    if args.tokens is None:
        print(line, file=sys.stderr)
    else:
        text = args.tokens.read_text() if args.tokens.exists() else ""
        if args.name in parse_tokens(text, source=str(args.tokens)).values():
            raise InvalidInput(f"{args.tokens} already has a token named {args.name!r}: "
                               "delete its line first to replace it")
        fd = os.open(args.tokens, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(("" if not text or text.endswith("\n") else "\n") + line + "\n")
        print(f"added {args.name!r} to {args.tokens}; the server picks it up within a second",
              file=sys.stderr)
    print(token)
    return 0
