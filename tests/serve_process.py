"""``latentserve serve`` as a child process, for tests that need a real one: signals,
SIGKILL mid-call, what it writes to its log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)")


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    head: list[str]  # what it printed up to and including the "serving on" line
    target: str      # 127.0.0.1:PORT


def start_serve(models: Path, *flags: str, merge_logs: bool = True) -> ServeProcess:
    """Start ``serve`` on 127.0.0.1:0 with ``models`` and ``flags``, and read its output
    until it says where it serves. ``merge_logs``: its log (stderr) comes on stdout too,
    for the test to read; else the log is dropped (nothing reads it: a full pipe would
    stall the server)."""
    cmd = [sys.executable, "-m", "latentserve.cli", "serve", "--host", "127.0.0.1",
           "--port", "0", "--models", str(models), "--intra-op-threads", "1", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_logs else subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    head = []
    for line in proc.stdout:
        head.append(line)
        match = SERVING.search(line)
        if match:
            return ServeProcess(proc, head, f"127.0.0.1:{match[1]}")
    proc.wait()
    raise AssertionError("the server exited before serving: " + "".join(head))
