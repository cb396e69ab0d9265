"""tape.files: every result file appears whole or not at all."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tape.files import (
    CommitError,
    atomic_output,
    probe_writable,
    staged_folder,
    to_json_text,
    write_json_atomic,
    write_table_csv,
)
from tape.trace import load_trace, write_expert_load_json


def test_atomic_output_moves_the_file_into_place_only_on_success(tmp_path):
    path = tmp_path / "sub" / "result.json"
    with atomic_output(path) as temporary:
        assert temporary.parent == path.parent and temporary != path
        temporary.write_text("new")
        assert not path.exists()  # nothing at the final name while the block runs
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_atomic_output_keeps_the_old_file_and_leaves_no_temporary_when_the_block_fails(tmp_path):
    path = tmp_path / "result.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"]


def test_write_table_csv_by_hand(tmp_path):
    path = tmp_path / "loads.csv"
    write_table_csv(path, np.array([[1, 2.5], [0, 1e-3]]), ["GPU0", "GPU1"], "layer")
    assert path.read_text() == "layer,GPU0,GPU1\n0,1.0,2.5\n1,0.0,0.001\n"


def test_json_text_takes_numpy_values_and_paths_and_refuses_other_objects(tmp_path):
    data = {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(3), "p": Path("a/b")}
    assert json.loads(to_json_text(data)) == {"n": 3, "x": 0.5, "a": [0, 1, 2], "p": "a/b"}
    with pytest.raises(TypeError, match="cannot write object as JSON"):
        to_json_text({"bad": object()})
    path = tmp_path / "out.json"
    with pytest.raises(TypeError, match="cannot write set as JSON"):
        write_json_atomic(path, {"bad": {1, 2}})
    assert list(tmp_path.iterdir()) == []  # the failed write left nothing behind
    write_json_atomic(path, data)
    assert path.read_text().endswith("\n") and json.loads(path.read_text())["a"] == [0, 1, 2]


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_written_files_get_the_usual_permissions(tmp_path):
    # Written through a temporary file, yet readable as any new file is (not mkstemp's 0o600).
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    write_table_csv(tmp_path / "b.csv", np.ones((2, 2)), ["x", "y"], "layer")
    write_expert_load_json(np.ones((1, 1, 2)), tmp_path / "c.json")
    for name in ("a.json", "b.csv", "c.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == _umask_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv", "c.json"]


def test_an_interrupted_trace_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    write_expert_load_json(np.ones((1, 1, 2)), path)
    before = path.read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tape.trace._step_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_expert_load_json(np.zeros((3, 1, 2)), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
    np.testing.assert_array_equal(load_trace(path), np.ones((1, 1, 2)))


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_staged_folder_moves_a_new_folder_in_whole(tmp_path):
    out = tmp_path / "new" / "out"
    with staged_folder(out) as staging:
        (staging / "a.csv").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.json").write_text("b")
        assert not out.exists()  # nothing at --out while the run writes
        assert staging.parent == out.parent and staging.name.startswith(".")
    assert _entries(out) == ["a.csv", "sub"] and (out / "sub" / "b.json").read_text() == "b"
    assert _entries(out.parent) == ["out"]  # no staging folder left


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError, SystemExit])
def test_staged_folder_leaves_nothing_when_the_run_stops(tmp_path, interruption):
    out = tmp_path / "new" / "out"
    with pytest.raises(interruption), staged_folder(out) as staging:
        (staging / "a.csv").write_text("a")
        raise interruption
    assert _entries(tmp_path) == []  # neither --out, nor the staging folder, nor `new`


def test_staged_folder_keeps_old_files_until_the_new_ones_are_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.csv").write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as staging:
        (staging / "a.csv").write_text("half")
        raise KeyboardInterrupt
    assert _entries(out) == ["a.csv", "notes.txt"] and (out / "a.csv").read_text() == "old"
    with staged_folder(out) as staging:
        (staging / "a.csv").write_text("new")
        assert (out / "a.csv").read_text() == "old"
    assert _entries(out) == ["a.csv", "notes.txt"]
    assert (out / "a.csv").read_text() == "new" and (out / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_staged_folder_fails_before_the_block_where_it_cannot_write():
    ran = []
    with pytest.raises(OSError), staged_folder(Path("/proc/tape-out")):
        ran.append(True)
    assert not ran


def test_staged_folder_writes_through_a_symbolic_link_and_resolves_dot_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("link").symlink_to("target")  # dangling: its target does not exist yet
    with staged_folder(Path("link")) as staging:
        (staging / "a.csv").write_text("a")
    assert _entries(tmp_path / "target") == ["a.csv"] and Path("link").is_symlink()
    Path("here").mkdir()
    with staged_folder(Path("nope/../here")) as staging:  # `nope` need not exist
        (staging / "b.csv").write_text("b")
    assert _entries(tmp_path / "here") == ["b.csv"]
    assert sorted(_entries(tmp_path)) == ["here", "link", "target"]


def test_staged_folder_never_merges_into_a_folder_another_run_made_meanwhile(tmp_path):
    out = tmp_path / "out"
    with (pytest.raises(CommitError, match="another run made it meanwhile") as caught,
          staged_folder(out) as staging):
        (staging / "mine.csv").write_text("mine")
        out.mkdir()  # the other run
        (out / "theirs.csv").write_text("theirs")
    assert _entries(out) == ["theirs.csv"]
    kept = caught.value.staging
    assert _entries(kept) == ["mine.csv"] and str(kept) in str(caught.value)


def test_each_staging_folder_is_new_and_a_left_one_is_not_touched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    left = out / ".staging-left-by-a-killed-run"
    left.mkdir()
    (left / "x").write_text("x")
    with staged_folder(out) as first, staged_folder(out) as second:
        assert first != second and first.parent == second.parent == out
        (first / "a.csv").write_text("a")
        (second / "b.csv").write_text("b")
    assert _entries(out) == [".staging-left-by-a-killed-run", "a.csv", "b.csv"]
    assert (left / "x").read_text() == "x"


def test_probe_writable_leaves_nothing_and_fails_where_it_cannot_write(tmp_path):
    probe_writable(tmp_path / "new" / "out")
    existing = tmp_path / "existing"
    existing.mkdir()
    probe_writable(existing)
    assert _entries(tmp_path) == ["existing"] and _entries(existing) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        probe_writable(tmp_path / "file" / "out")
    assert _entries(tmp_path) == ["existing", "file"]


def test_nothing_moves_when_a_staged_file_would_meet_a_folder(tmp_path):
    out = tmp_path / "out"
    (out / "manifest.json").mkdir(parents=True)  # a folder where a file will go
    (out / "other.csv").write_text("old")
    with pytest.raises(CommitError, match="manifest.json is in the way") as caught, \
            staged_folder(out) as staging:
        (staging / "other.csv").write_text("new")
        (staging / "manifest.json").write_text("{}")
    assert (out / "other.csv").read_text() == "old"  # not half moved
    assert _entries(caught.value.staging) == ["manifest.json", "other.csv"]


def test_ctrl_c_during_the_final_move_is_held_until_every_file_is_in(tmp_path, monkeypatch):
    import signal

    import tape.files

    out = tmp_path / "out"
    out.mkdir()
    move = tape.files._move_into

    def interrupted_move(source, target):
        os.kill(os.getpid(), signal.SIGINT)  # arrives before any file has moved
        move(source, target)

    monkeypatch.setattr(tape.files, "_move_into", interrupted_move)
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as staging:
        for name in ("a.csv", "b.csv", "manifest.json"):
            (staging / name).write_text(name)
    assert _entries(out) == ["a.csv", "b.csv", "manifest.json"]
