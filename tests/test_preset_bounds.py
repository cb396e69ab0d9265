"""Cost-model fields must be finite, positive and physically sensible (docs/cost-model.md)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from tape.cli import app
from tape.errors import ConfigError
from tape.preset_bounds import FIELD_BOUNDS
from tape.presets import _builtin, load_config


def write_config(tmp_path, section: str, key: str, value) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({section: {key: value}}))
    return str(path)


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("model", "bytes_per_parameter", 1e308, "between 0.125 and 8 bytes"),
    ("model", "hidden_size", 2**40, "between 1 and 1.04858e\\+06"),
    ("cluster", "ib_bandwidth", 1e-300, "between 1e\\+06 and 1e\\+14 B/s"),
    ("cluster", "nvlink_bandwidth", 1e300, "between 1e\\+06 and 1e\\+14 B/s"),
    ("cluster", "flops", 5.0, "between 1e\\+09 and 1e\\+18 FLOP/s"),
])
def test_a_field_outside_its_physical_range_is_an_error(tmp_path, section, key, value, message):
    path = write_config(tmp_path, section, key, value)
    with pytest.raises(ConfigError, match=f"{key} must be {message}"):
        load_config(path)


def test_every_shipped_preset_lies_within_the_ranges():
    for section in _builtin().values():
        for name, fields in section.items():
            for key, value in fields.items():
                if key in FIELD_BOUNDS and isinstance(value, (int, float)):  # null: no groups
                    low, high, _ = FIELD_BOUNDS[key]
                    assert low <= value <= high, (name, key, value)


def test_the_command_line_says_so_in_one_line_and_scores_nothing(tmp_path):
    path = write_config(tmp_path, "model", "bytes_per_parameter", 1e308)
    result = CliRunner().invoke(app, ["compare", "--config", path, "--policies", "vanilla"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "bytes_per_parameter must be between" in result.stderr
