"""Trace loading, validation, windowing and JSON writing (tape.trace, tape.trace_formats)."""

import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tape.errors import TraceError
from tape.trace import (
    STEPS_PER_BLOCK,
    check_loads,
    describe,
    load_trace,
    window_loads,
    write_expert_load_json,
)

FIXTURES = Path(__file__).parent / "fixtures"

# The hand-written contents of fixtures/expert-load-tiny.json.
TINY_JSON_STEPS = [
    [[1, 0, 2, 5], [3, 3, 0, 1]],
    [[0, 4, 1, 1], [2, 2, 2, 2]],
    [[7, 0, 0.5, 1], [0, 1, 5, 0]],
]


def test_json_fixture_loads_every_step_and_ignores_extra_keys():
    loads = load_trace(FIXTURES / "expert-load-tiny.json")
    assert loads.dtype == np.float64
    assert loads.shape == (3, 2, 4)
    assert loads.tolist() == TINY_JSON_STEPS
    # Column sums worked by hand: layer 0 = [8, 4, 3.5, 7], layer 1 = [5, 6, 7, 3].
    assert loads.sum(axis=0).tolist() == [[8, 4, 3.5, 7], [5, 6, 7, 3]]


def test_csv_folder_uses_natural_order_and_rows_as_steps():
    loads = load_trace(FIXTURES / "moe_token_dist")
    # Layers in the order layer_1, layer_2, layer_10 (not layer_1, layer_10, layer_2).
    assert loads.shape == (2, 3, 4)
    assert loads[0].tolist() == [[1, 2, 3, 4], [5, 0, 0, 5], [0, 0, 9, 0]]
    assert loads[1].tolist() == [[0, 1, 0, 1], [1, 1, 1, 1], [2, 0, 0, 2]]


def test_csv_folder_with_unequal_rows_sums_columns_into_one_step(tmp_path):
    (tmp_path / "layer0.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "layer1.csv").write_text("1,0,1\n1,0,1\n1,0,1\n")
    loads = load_trace(tmp_path)
    assert loads.shape == (1, 2, 3)
    assert loads[0].tolist() == [[5, 7, 9], [3, 0, 3]]
    # One step cannot be cut into windows, and the error says why (it once read "needs at
    # least 2 windows ... got 1: use a longer trace or a smaller --interval").
    with pytest.raises(
        TraceError, match=r"single step \(1 step x 2 layers x 3 experts\)"
    ) as caught:
        window_loads(loads, 1)
    assert (
        "CSV files is read as one step (each layer file's column sums) when its files have "
        "different row counts" in str(caught.value)
    )


def test_csv_folder_with_one_row_per_file(tmp_path):
    (tmp_path / "a.csv").write_text("1,2\n")
    (tmp_path / "b.csv").write_text("3,4\n")
    assert load_trace(tmp_path).tolist() == [[[1, 2], [3, 4]]]


def test_numpy_files(tmp_path):
    loads = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    np.save(tmp_path / "trace.npy", loads)
    np.savez(tmp_path / "one.npz", anything=loads)
    np.savez(tmp_path / "named.npz", loads=loads, other=np.zeros(3))
    np.save(tmp_path / "single.npy", loads[0])
    for name in ("trace.npy", "one.npz", "named.npz"):
        result = load_trace(tmp_path / name)
        assert result.dtype == np.float64
        assert np.array_equal(result, loads)
    assert load_trace(tmp_path / "single.npy").shape == (1, 3, 4)


def test_sglang_dump_needs_torch(tmp_path, monkeypatch):
    dump = tmp_path / "expert_distribution.pt"
    dump.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(TraceError, match=r"expert_distribution\.pt: .*needs PyTorch") as caught:
        load_trace(dump)
    # The torch extra (with the version TAPE was tested with), not a bare `pip install torch`,
    # as the evolve extra's hint.
    assert (
        "`pip install -e '.[torch]'` in a checkout of TAPE (a CPU build of torch is enough)"
    ) in str(caught.value)


def _numpy_bytes(save, **arrays) -> bytes:
    buffer = io.BytesIO()
    save(buffer, **arrays)
    return buffer.getvalue()


NPZ = _numpy_bytes(np.savez, loads=np.ones((300, 2, 4)))
NPZ_COMPRESSED = _numpy_bytes(np.savez_compressed, loads=np.arange(2400.0).reshape(300, 2, 4))
NPY = _numpy_bytes(lambda buffer, loads: np.save(buffer, loads), loads=np.ones((300, 2, 4)))


def _zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, data, message",
    [
        # Truncated archives once raised zipfile.BadZipFile, a traceback.
        ("trace.npz", NPZ[:200], r"not a valid \.npz file, truncated or damaged\? \(File is not"),
        ("trace.npz", NPZ[:20], r"not a valid \.npz file, truncated or damaged\?"),
        ("trace.npz", NPZ[:-30], r"not a valid \.npz file, truncated or damaged\?"),
        ("trace.npz", NPZ_COMPRESSED[:-200], r"not a valid \.npz file, truncated or damaged\?"),
        ("trace.npz", NPZ[:3], r"not a valid \.npy or \.npz file \(it starts with neither"),
        ("trace.npy", NPY[:200], r"not a valid \.npy file, truncated or damaged\?"),
        ("trace.npy", NPY[:8], r"not a valid \.npy file, truncated or damaged\?"),
        # An empty file was an EOFError, which the command line showed as a bare "Aborted.".
        ("trace.npy", b"", r"empty file \(expected a \.npy or \.npz array\)"),
        ("trace.npz", b"", r"empty file"),
        ("trace.npz", b"hello", r"not a valid \.npy or \.npz file"),
        ("trace.npz", _numpy_bytes(np.savez), r"expected one array .*, found none"),
        ("trace.npz", _zip_of("loads.txt", b"1,2"), r"'loads\.txt' in the archive is not a \.npy"),
        (
            "trace.npz",
            _zip_of(
                "loads.npy",
                _numpy_bytes(
                    lambda buffer, loads: np.save(buffer, loads), loads=np.array([{}], dtype=object)
                ),
            ),
            r"holds Python objects \(an object array\), not numbers",
        ),
    ],
)
def test_damaged_numpy_files_are_one_line_errors(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(TraceError, match=message) as caught:
        load_trace(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_every_truncation_of_a_numpy_file_is_a_trace_error(tmp_path):
    for name, data in (("t.npz", NPZ), ("c.npz", NPZ_COMPRESSED), ("t.npy", NPY)):
        path = tmp_path / name
        for length in range(0, len(data), len(data) // 30):
            path.write_bytes(data[:length])
            with pytest.raises(TraceError, match=f"{name}: (empty|not a valid)"):
                load_trace(path)


def _npy_header(shape, write_header=np.lib.format.write_array_header_1_0) -> bytes:
    buffer = io.BytesIO()
    write_header(buffer, {"shape": shape, "fortran_order": False, "descr": "<f8"})
    return buffer.getvalue()


HUGE = (10**6, 58, 256)  # 118,784,000,000 bytes of float64
HUGE_SAYS = r"says 118,784,000,000 bytes of data, \(1000000, 58, 256\) float64"


def _deflated_zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, data, message",
    [
        # A 1 KB file whose header claims 118 GB was a MemoryError traceback (numpy allocates
        # the array its header describes before reading it).
        (
            "huge.npy",
            _npy_header(HUGE) + bytes(900),
            rf"its header {HUGE_SAYS}, the file has 900\)",
        ),
        (
            "huge2.npy",
            _npy_header(HUGE, np.lib.format.write_array_header_2_0) + bytes(900),
            rf"its header {HUGE_SAYS}, the file has 900\)",
        ),
        (
            "huge.npz",
            _zip_of("loads.npy", _npy_header(HUGE) + bytes(900)),
            rf"the header of 'loads\.npy' {HUGE_SAYS}, the member has 900\)",
        ),
        (
            "deflated.npz",
            _deflated_zip_of("trace", _npy_header(HUGE) + bytes(900)),
            rf"the header of 'trace' {HUGE_SAYS}, the member has 900\)",
        ),
        ("negative.npy", _npy_header((-1, 2, 4)) + bytes(64), r"gives the shape \(-1, 2, 4\)"),
        # One byte short of (300, 2, 4) float64.
        (
            "short.npy",
            NPY[:-1],
            r"says 19,200 bytes of data, \(300, 2, 4\) float64, the file has 19,199\)",
        ),
    ],
)
def test_a_header_promising_more_data_than_the_file_holds(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    kind = re.escape(path.suffix)
    with pytest.raises(
        TraceError, match=rf"not a valid {kind} file, truncated or damaged\? .*" + message
    ) as caught:
        load_trace(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_a_longer_npy_file_than_its_header_says_still_loads(tmp_path):
    path = tmp_path / "padded.npy"
    path.write_bytes(NPY + bytes(16))  # numpy reads what the header says and ignores the rest
    assert load_trace(path).shape == (300, 2, 4)


@pytest.mark.parametrize(
    "name, function",
    [("trace.npy", "load"), ("trace.npz", "load"), ("csv", "loadtxt")],
)
def test_a_trace_too_big_for_memory_is_a_one_line_error(tmp_path, monkeypatch, name, function):
    if name == "csv":
        path = tmp_path / "csv"
        path.mkdir()
        (path / "layer_0.csv").write_text("1,2\n")
    else:
        path = tmp_path / name
        path.write_bytes(NPY if name.endswith(".npy") else NPZ)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(np, function, out_of_memory)
    with pytest.raises(TraceError, match="the trace does not fit in memory") as caught:
        load_trace(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_a_folder_named_like_a_layer_file_is_a_one_line_error(tmp_path):
    (tmp_path / "layer_0.csv").write_text("1,2\n")
    (tmp_path / "layer_1.csv").mkdir()  # once an IsADirectoryError traceback
    with pytest.raises(TraceError) as caught:
        load_trace(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'layer_1.csv'}: cannot read it: Is a directory"


@pytest.mark.parametrize("name", ["trace.npy", "trace.npz", "expert-load.json", "dump.pt"])
def test_a_file_the_system_refuses_to_open_is_a_one_line_error(tmp_path, monkeypatch, name):
    # Tests may run as root, for whom `chmod 000` blocks nothing: open() refuses instead. (A
    # CSV layer is opened by numpy's own opener: test_a_folder_named_like_a_layer_file...)
    if name == "dump.pt":
        torch = pytest.importorskip("torch")
        torch.save(torch.ones(2, 1, 2), tmp_path / name)
    else:
        write_expert_load_json(np.ones((2, 1, 2)), tmp_path / "expert-load.json")
        np.save(tmp_path / "trace.npy", np.ones((2, 1, 2)))
        np.savez(tmp_path / "trace.npz", loads=np.ones((2, 1, 2)))
    refused = tmp_path / name
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(refused):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(TraceError) as caught:
        load_trace(tmp_path / name)
    assert str(caught.value) == f"{refused}: cannot read it: Permission denied"


def test_an_unreadable_folder_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "layer_0.csv").write_text("1,2\n")

    def refusing_iterdir(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(Path, "iterdir", refusing_iterdir)
    with pytest.raises(TraceError) as caught:
        load_trace(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read it: Permission denied"


def test_sglang_dump_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    counts = torch.arange(2 * 3 * 4, dtype=torch.int32).reshape(2, 3, 4)
    torch.save({"rank": 0, "logical_count": counts}, tmp_path / "dict.pt")
    torch.save(counts, tmp_path / "bare.pt")
    torch.save({"physical_count": counts}, tmp_path / "wrong_key.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    expected = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    assert np.array_equal(load_trace(tmp_path / "dict.pt"), expected)
    assert np.array_equal(load_trace(tmp_path / "bare.pt"), expected)
    with pytest.raises(TraceError, match=r"wrong_key\.pt: no 'logical_count'.*physical_count"):
        load_trace(tmp_path / "wrong_key.pt")
    torch.save({"logical_count": np.ones((2, 3, 4))}, tmp_path / "numpy_inside.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "dict.pt").read_bytes()[:300])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, reason in [
        ("garbage.pt", r"Unsupported operand"),
        ("numpy_inside.pt", r"Unsupported global"),
        ("truncated.pt", r"zip archive"),
    ]:
        # torch.load's error is many lines telling how to load unsafely: one line of it is kept.
        with pytest.raises(
            TraceError, match=rf"{name}: torch\.load cannot read it .*{reason}"
        ) as caught:
            load_trace(tmp_path / name)
        assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)
    with pytest.raises(TraceError, match=r"empty\.pt: empty file"):
        load_trace(tmp_path / "empty.pt")


def test_sglang_dump_of_a_sparse_tensor_is_read_dense(tmp_path):
    torch = pytest.importorskip("torch")
    counts = torch.tensor([[[0.0, 3.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]]])
    torch.save({"logical_count": counts.to_sparse()}, tmp_path / "sparse.pt")
    assert np.array_equal(load_trace(tmp_path / "sparse.pt"), counts.numpy())  # was a traceback


def _steps_json(*steps: object) -> str:
    return json.dumps({"load_history": [{"logical_expert_load": step} for step in steps]})


BAD_JSON = [
    ('{"load_history": [{"logical_expert_load": [[1, 2]]}', "malformed JSON.*premature EOF"),
    ('{"load_history": [{"logical_expert_load": [[1, 2]]},]}', "malformed JSON"),
    ('{"load_history": [{"logical_expert_load": [[NaN, 2]]}]}', "JSON has no NaN or Infinity"),
    ("", "malformed JSON"),
    ('{"steps": [[1, 2]]}', "no 'load_history' key"),
    ('{"load_history": []}', "'load_history' is empty"),
    ('{"load_history": {"a": 1}}', "'load_history' must be a list of steps, got a JSON object"),
    ("[[1, 2]]", "expected a JSON object with a 'load_history' list, got a JSON list"),
    ('{"load_history": [{"load": [[1]]}]}', r"load_history\[0\] has no 'logical_expert_load'"),
    ('{"load_history": [[[1]]]}', r"load_history\[0\] has no 'logical_expert_load'"),
    (_steps_json([[1, 2], [3]]), "ragged load at step 0: layer 1 has 1 expert, layer 0 has 2"),
    (
        _steps_json([[1, 2], [3, 4]], [[1, 2], [3, 4], [5, 6]]),
        "ragged load at step 1: 3 layers x 2 experts, step 0 has 2 x 2",
    ),
    (
        _steps_json([[1, 2]], [[1, 2]], [[1, 2, 3]]),
        "ragged load at step 2: 1 layer x 3 experts, step 0 has 1 x 2",
    ),
    (_steps_json([]), "step 0: logical_expert_load has no layers"),
    (_steps_json([[1, 2], []]), "step 0: logical_expert_load must be a list of per-layer lists"),
    (_steps_json([1, 2]), "step 0: logical_expert_load must be a list of per-layer lists"),
    (_steps_json([[1, 2]], [[1, "2"]]), "step 1 holds non-numeric"),
    (_steps_json([[1, None]]), "step 0 holds non-numeric"),
    (_steps_json([[1, [2]]]), "step 0 holds non-numeric"),
    (_steps_json([[1, 2]], [[3, -4]]), "expert 1 in layer 0 at step 1 is negative"),
    ('{"load_history": [{"logical_expert_load": [[1e999]]}]}', "malformed JSON.*overflow"),
]


@pytest.mark.parametrize("text, message", BAD_JSON)
def test_bad_json_raises_trace_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "expert-load.json"
    path.write_text(text)
    with pytest.raises(TraceError, match=message) as caught:
        load_trace(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


BAD_CSV = [
    ({}, "no .csv files in this folder"),
    (
        {"l0.csv": "1,2\n", "l1.csv": "1,2,3\n"},
        r"l1\.csv: 3 experts \(columns\), but l0\.csv has 2",
    ),
    ({"l0.csv": "e0,e1\n1,2\n"}, r"l0\.csv: not a CSV .*: row 1, column 1 holds 'e0', not a"),
    ({"l0.csv": "1,2\n3,x\n"}, r"row 2, column 2 holds 'x', not a number$"),
    ({"l0.csv": "1,2,\n"}, r"row 1, column 3 is empty$"),
    # numpy's own words were "changed from 2 to 1 at row 2; use `usecols` to select a subset".
    ({"l0.csv": "1,2\n3\n"}, r"l0\.csv: not a CSV .*: row 2 has 1 value, the rows before it 2 "),
    ({"l0.csv": "1,2\n3,4,5\n"}, r"row 2 has 3 values, the rows before it 2"),
    ({"l0.csv": "1,2\n", "l1.csv": "1\n"}, r"l1\.csv: 1 expert \(columns\), but l0\.csv has 2$"),
    ({"l0.csv": ""}, r"l0\.csv: empty CSV file"),
    ({"l0.csv": "1,-2\n"}, "expert 1 in layer 0 at step 0 is negative"),
    ({"l0.csv": "1,nan\n"}, r"expert 1 in layer 0 at step 0 is nan"),
    ({"l0.csv": "1,inf\n"}, r"expert 1 in layer 0 at step 0 is inf"),
]


@pytest.mark.parametrize("files, message", BAD_CSV)
def test_bad_csv_folder_raises_trace_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(TraceError, match=message) as caught:
        load_trace(tmp_path)
    assert str(tmp_path) in str(caught.value)
    assert "usecols" not in str(caught.value) and "\n" not in str(caught.value)


def test_other_bad_files(tmp_path):
    with pytest.raises(TraceError, match=r"missing\.json: no such trace file or folder"):
        load_trace(tmp_path / "missing.json")
    (tmp_path / "trace.txt").write_text("1,2")
    with pytest.raises(TraceError, match=r"trace\.txt: unknown trace format '\.txt'"):
        load_trace(tmp_path / "trace.txt")
    np.savez(tmp_path / "two.npz", a=np.ones((1, 1, 1)), b=np.ones((1, 1, 1)))
    with pytest.raises(TraceError, match=r"two\.npz: expected one array .* found a, b"):
        load_trace(tmp_path / "two.npz")
    np.save(tmp_path / "four.npy", np.ones((1, 2, 3, 4)))
    with pytest.raises(TraceError, match=r"four\.npy: .*shape \[steps, layers, experts\]"):
        load_trace(tmp_path / "four.npy")
    np.save(tmp_path / "nan.npy", np.array([[[1.0, np.nan]]]))
    with pytest.raises(TraceError, match=r"nan\.npy: load of expert 1 in layer 0 at step 0 is nan"):
        load_trace(tmp_path / "nan.npy")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(TraceError, match=r"broken\.npy: not a valid \.npy or \.npz file"):
        load_trace(tmp_path / "broken.npy")


def test_check_loads_checks_shape_against_the_model():
    loads = np.ones((5, 3, 8))
    assert check_loads(loads, num_layers=3, num_experts=8) is loads
    with pytest.raises(TraceError, match="trace has 8 experts, expected 16 .5 steps x 3 layers"):
        check_loads(loads, num_experts=16)
    with pytest.raises(TraceError, match="my.json: trace has 3 layers, expected 58"):
        check_loads(loads, num_layers=58, source="my.json")
    with pytest.raises(TraceError, match="must be numbers"):
        check_loads(np.array([[["a"]]]))
    with pytest.raises(TraceError, match="all non-empty"):
        check_loads(np.ones((0, 3, 8)))


def test_loads_beyond_an_exact_token_count_are_refused():
    # 1e300 ran with overflow RuntimeWarnings (the policies' float32, sums of squares) and
    # meaningless scores
    loads = np.ones((2, 1, 3))
    loads[1, 0, 2] = 1e300
    with pytest.raises(TraceError, match=r"expert 2 in layer 0 at step 1 is 1e\+300, more than"):
        check_loads(loads)
    loads[1, 0, 2] = 2.0**53 + 2  # just above: both numbers in full, not 9.007e+15 twice
    with pytest.raises(TraceError, match="is 9007199254740994, more than 9007199254740992"):
        check_loads(loads)
    loads[1, 0, 2] = 2.0**53
    assert check_loads(loads) is loads
    with pytest.raises(TraceError, match="at window 0 is"):  # windows sum steps: checked too
        check_loads(window_loads(np.full((2, 1, 3), 2.0**53), 2), unit="window")


def test_describe():
    assert describe(np.zeros((1170, 58, 256))) == "1170 steps x 58 layers x 256 experts"
    assert describe(np.zeros((1, 1, 2))) == "1 step x 1 layer x 2 experts"


def test_window_loads_by_hand():
    loads = np.arange(5 * 1 * 2, dtype=np.float64).reshape(5, 1, 2)
    # steps: [0,1] [2,3] [4,5] [6,7] [8,9]; interval 2 -> [0+2, 1+3], [4+6, 5+7], and step 4
    # alone as the last, shorter window (as the seed's evaluator does).
    assert window_loads(loads, 2).tolist() == [[[2, 4]], [[10, 12]], [[8, 9]]]
    assert window_loads(loads, 5).tolist() == [[[20, 25]]]
    assert window_loads(loads, 1).tolist() == loads.tolist()
    # A trace shorter than one interval is one (short) window.
    assert window_loads(loads, 6).tolist() == [[[20, 25]]]


@pytest.mark.parametrize("interval", [0, -100, 2.5, True, "100", None])
def test_window_loads_rejects_bad_interval(interval):
    with pytest.raises(TraceError, match="interval must be a positive integer"):
        window_loads(np.ones((10, 1, 2)), interval)


@settings(max_examples=40, deadline=None)
@given(
    steps=st.integers(2, 30),  # a single step is refused (test_csv_folder_with_unequal_rows...)
    interval=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_window_loads_matches_a_plain_loop(steps, interval, seed):
    loads = np.random.default_rng(seed).integers(0, 50, size=(steps, 2, 3)).astype(float)
    expected = []
    for start in range(0, steps, interval):
        total = np.zeros((2, 3))
        for step in range(start, min(start + interval, steps)):
            total += loads[step]
        expected.append(total)
    assert np.array_equal(window_loads(loads, interval), np.array(expected))


@settings(max_examples=25, deadline=None)
@given(
    loads=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, max_side=4),
        elements=st.one_of(
            st.integers(0, 10**6).map(float),
            st.floats(0, 1e9, allow_nan=False, allow_infinity=False),
        ),
    ),
    indent=st.sampled_from([None, 1, 2]),
)
def test_write_then_load_round_trip(tmp_path_factory, loads, indent):
    path = tmp_path_factory.mktemp("round_trip") / "expert-load.json"
    write_expert_load_json(loads, path, indent=indent)
    assert np.array_equal(load_trace(path), loads)


def test_written_json_is_laid_out_as_json_dump(tmp_path):
    steps = [[[1, 2, 3], [4, 5, 6]], [[0, 0, 7], [8, 0, 9]]]
    loads = np.array(steps, dtype=np.float64)
    reference = {"load_history": [{"logical_expert_load": step} for step in steps]}
    for indent in (None, 2):
        path = tmp_path / f"indent-{indent}.json"
        write_expert_load_json(loads, path, indent=indent)
        text = path.read_text()
        assert json.loads(text) == json.loads(json.dumps(reference))
        assert "1.0" not in text  # whole numbers are written as integers
    assert (tmp_path / "indent-2.json").read_text() == json.dumps(reference, indent=2) + "\n"


def test_json_longer_than_one_block(tmp_path):
    steps = 2 * STEPS_PER_BLOCK + 5
    loads = np.random.default_rng(0).integers(0, 1000, size=(steps, 2, 3)).astype(float)
    write_expert_load_json(loads, tmp_path / "long.json")
    assert np.array_equal(load_trace(tmp_path / "long.json"), loads)
    assert np.array_equal(window_loads(loads, 100)[0], loads[:100].sum(axis=0))


def test_a_binary_json_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b'\xff\xfe{"load_history": []}')
    with pytest.raises(TraceError, match="malformed JSON") as caught:
        load_trace(path)
    message = str(caught.value)
    assert "\n" not in message and "b'" not in message and str(path) in message


@pytest.mark.parametrize("loads", [[[1.0, 2.0], [3.0]], [[[1.0, 2.0], [3.0]]]])
def test_ragged_loads_are_a_trace_error(loads):
    with pytest.raises(TraceError, match="ragged"):
        check_loads(loads)
