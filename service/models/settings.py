"""Per-model serving settings: ``models/<name>/config.json``, beside the version folders.

Schema 1 (every key but ``schema`` optional; an absent key takes the server-wide value)::

    {
      "schema": 1,
      "max_batch_size": 64,        # largest merged batch for this model (images), >= 1
      "max_queue_delay_us": 500,   # longest a queued image waits for a batch to fill, >= 0
      "compute_lanes": 1           # threads of this model's own compute pool, >= 1;
                                   # absent: the server's shared pool (--compute-workers)
    }

The file applies to every version of the name. It is read when a version loads, when
the watcher sees it change, and on ``models reload``; a file that does not validate
refuses the load that reads it (naming the file and the key), and a change that does
not validate leaves the settings in force as they were.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentserve.errors import ModelIntegrityError

SETTINGS_FILE = "config.json"
SETTINGS_SCHEMA = 1
_KEYS = {"max_batch_size": 1, "max_queue_delay_us": 0, "compute_lanes": 1}  # key -> minimum
# A lane is a thread; far past the core count they only contend.
MAX_LANES = 64

Stamp = tuple[int, int, int] | None


@dataclass(frozen=True)
class ModelSettings:
    """One model's overrides; None = the server-wide value."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    compute_lanes: int | None = None

    def batch_size(self, default: int) -> int:
        return default if self.max_batch_size is None else self.max_batch_size

    def queue_delay_us(self, default: int) -> int:
        return default if self.max_queue_delay_us is None else self.max_queue_delay_us


def settings_path(model_dir: Path) -> Path:
    """``models/<name>/config.json`` for the folder ``models/<name>``."""
    return Path(model_dir) / SETTINGS_FILE


def settings_stamp(model_dir: Path) -> Stamp:
    """What changes when the settings file does (None when there is none)."""
    try:
        st = settings_path(model_dir).stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def parse_settings(data: bytes, *, where: str) -> ModelSettings:
    """Validate a settings file's bytes; ModelIntegrityError names the file and the key."""
    try:
        raw: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelIntegrityError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("schema") != SETTINGS_SCHEMA:
        raise ModelIntegrityError(f"{where}: schema must be {SETTINGS_SCHEMA}, got "
                                  f"{raw.get('schema')!r}")
    unknown = sorted(set(raw) - set(_KEYS) - {"schema"})
    if unknown:
        raise ModelIntegrityError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
                                  f"schema, {', '.join(_KEYS)}")
    values: dict[str, int] = {}
    for key, lo in _KEYS.items():
        if key not in raw:
            continue
        v = raw[key]
        hi = MAX_LANES if key == "compute_lanes" else None
        if (isinstance(v, bool) or not isinstance(v, int) or v < lo
                or (hi is not None and v > hi)):
            allowed = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ModelIntegrityError(f"{where}: {key} must be {allowed}, got {v!r}")
        values[key] = v
    return ModelSettings(**values)


def read_settings(model_dir: Path) -> ModelSettings:
    """The settings of the model in folder ``models/<name>``; defaults when it has no file."""
    path = settings_path(model_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ModelSettings()
    return parse_settings(data, where=str(path))
