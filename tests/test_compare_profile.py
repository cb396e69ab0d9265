"""`tape compare --profile DIR`: a profile of each policy's calls, named in the manifests."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tape.cli import app

pytest.importorskip("pyinstrument")
runner = CliRunner()
FLAGS = ["--replicas", "12", "--groups", "2", "--nodes", "2", "--gpus", "4", "--interval", "10"]



def _compare(small_trace, *args):
    return runner.invoke(app, ["compare", "--trace", str(small_trace), "--policies",
                               "deepseek,tape:fast", *args, *FLAGS])


def test_each_policy_gets_a_profile_of_its_own_calls(small_trace, tmp_path):
    profile, out = tmp_path / "profile", tmp_path / "out"
    result = _compare(small_trace, "--profile", str(profile), "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((profile / "manifest.json").read_text())
    assert manifest["profiler"] == "pyinstrument" and manifest["policies"] == ["deepseek",
                                                                               "tape:fast"]
    entry = manifest["profiles"]["tape:fast"]
    assert entry["files"] == ["tape_fast_profile.html", "tape_fast_profile.txt"]
    assert entry["calls"] == 3  # four windows: three calls
    text = (profile / "tape_fast_profile.txt").read_text()
    assert "tape_policy" in text and "hierarchical_placement" not in text
    assert "hierarchical_placement" in (profile / "deepseek_profile.txt").read_text()
    assert (profile / "deepseek_profile.html").read_text().lstrip().lower().startswith("<!doctype")
    named = json.loads((out / "manifest.json").read_text())["profiles"]
    assert named["deepseek"] == [str(profile / "deepseek_profile.html"),
                                 str(profile / "deepseek_profile.txt")]


def test_a_used_profile_folder_needs_overwrite_and_is_not_out(small_trace, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "x.txt").write_text("x")
    result = _compare(small_trace, "--profile", str(used))
    assert result.exit_code == 2 and "--profile" in result.output
    assert "already holds files" in result.output
    result = _compare(small_trace, "--profile", str(tmp_path / "same"), "--out", str(tmp_path / "same"))
    assert result.exit_code == 2 and "is --out's folder" in result.output
    assert not (tmp_path / "same").exists()


def test_json_names_the_profiles(small_trace, tmp_path):
    profile = tmp_path / "profile"
    result = _compare(small_trace, "--profile", str(profile), "--json")
    assert result.exit_code == 0, result.output
    profiles = json.loads(result.stdout)["profiles"]
    assert profiles["tape:fast"] == [str(profile / "tape_fast_profile.html"),
                                     str(profile / "tape_fast_profile.txt")]
    assert all(Path(path).is_file() for paths in profiles.values() for path in paths)
