"""models/<name>/config.json: the schema, validated with messages naming file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentserve.errors import ModelIntegrityError
from latentserve.service.models.settings import (
    ModelSettings,
    parse_settings,
    read_settings,
    settings_stamp,
)


def test_absent_file_and_absent_keys_take_the_server_defaults(tmp_path: Path) -> None:
    assert read_settings(tmp_path) == ModelSettings() and settings_stamp(tmp_path) is None
    s = parse_settings(b'{"schema": 1, "max_batch_size": 8}', where="f")
    assert (s.batch_size(256), s.queue_delay_us(1000), s.compute_lanes) == (8, 1000, None)
    (tmp_path / "config.json").write_text(json.dumps(
        {"schema": 1, "max_queue_delay_us": 0, "compute_lanes": 2}))
    s = read_settings(tmp_path)
    assert (s.batch_size(256), s.queue_delay_us(1000), s.compute_lanes) == (256, 0, 2)
    assert settings_stamp(tmp_path) is not None


@pytest.mark.parametrize(("text", "phrase"), [
    ("{", "is not valid JSON"),
    ("[]", "must hold a JSON object"),
    ('{"max_batch_size": 4}', "schema must be 1"),
    ('{"schema": 1, "batch": 4}', "unknown key(s) batch"),
    ('{"schema": 1, "max_batch_size": 0}', "max_batch_size must be an integer >= 1, got 0"),
    ('{"schema": 1, "max_batch_size": true}', "max_batch_size must be an integer"),
    ('{"schema": 1, "max_queue_delay_us": -1}', "max_queue_delay_us must be an integer >= 0"),
    ('{"schema": 1, "compute_lanes": 1000}', "compute_lanes must be an integer >= 1 and <= 64"),
])
def test_bad_settings_name_the_file_and_what_is_allowed(text: str, phrase: str) -> None:
    with pytest.raises(ModelIntegrityError) as err:
        parse_settings(text.encode(), where="models/m/config.json")
    assert "models/m/config.json" in str(err.value) and phrase in str(err.value)
