"""``latentserve models load|unload|reload NAME[:VERSION] --target HOST:PORT``.

The client of ``latentserve.v1.ModelControl`` (``service/models/control.py``): changes
what a running server serves without a restart. Prints the versions the call touched
and their state (``--json``: one document).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from latentserve.service.client.settings import (
    ClientSecurity,
    add_client_arguments,
    client_settings,
)

ACTIONS = {
    "load": "load (verify, build sessions, warm up) and serve a version",
    "unload": "stop serving a version (or every version of NAME) after a drain",
    "reload": "verify a version's files again, re-read its config.json, rebuild batchers",
}


def register_actions(models_parser: argparse.ArgumentParser) -> None:
    """Add the control actions under ``models`` (sharing its subcommands, if it has any)."""
    sub = models_parser._subparsers
    actions = (next(a for a in sub._group_actions
                    if isinstance(a, argparse._SubParsersAction))
               if sub is not None else models_parser.add_subparsers(dest="models_action"))
    for action, text in ACTIONS.items():
        p = actions.add_parser(action, help=text, description=text + ".")
        p.add_argument("model", metavar="NAME[:VERSION]")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        add_client_arguments(p)
        p.set_defaults(func=cmd_control, control_action=action)


def control(target: str, action: str, model: str, *, security: ClientSecurity | None = None,
            timeout: float = 120.0) -> list[dict[str, Any]]:
    """Call ModelControl.<action> for ``model``; one dict per version it touched."""
    from latentserve.service.client.channel import open_channel
    from latentserve.v1 import model_control_pb2 as pb
    from latentserve.v1 import model_control_pb2_grpc as pb_grpc

    with open_channel(target, security, max_message_bytes=16 << 20) as channel:
        stub = pb_grpc.ModelControlStub(channel)
        call = getattr(stub, action.capitalize())
        reply = call(pb.ModelControlRequest(model=model), timeout=timeout)
    return [{"ref": m.ref, "state": m.state, "newest": m.newest, "message": m.message}
            for m in reply.models]


def cmd_control(args: argparse.Namespace) -> int:
    import grpc

    from latentserve.errors import InvalidInput

    client = client_settings(args)
    try:
        # Loading a model takes a while: two minutes unless --timeout says otherwise.
        rows = control(client.server, args.control_action, args.model,
                       security=client.security(), timeout=client.timeout or 120.0)
    except grpc.RpcError as exc:
        # cli.main prints latentserve errors; a refusal is one line, not a traceback.
        raise InvalidInput(f"{args.control_action} {args.model}: {exc.code().name}: "
                           f"{exc.details()}") from None
    if args.json:
        print(json.dumps({"target": args.target, "action": args.control_action,
                          "models": rows}, indent=1))
        return 0
    for r in rows:
        extra = " (NAME resolves here)" if r["newest"] else ""
        print(f"{r['ref']}: {r['state']}{extra}{': ' + r['message'] if r['message'] else ''}")
    return 0
