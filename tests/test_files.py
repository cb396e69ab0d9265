"""tape.files: every result file appears whole or not at all."""

import json
from pathlib import Path

import numpy as np
import pytest

from tape.files import atomic_output, to_json_text, write_json_atomic, write_table_csv


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
