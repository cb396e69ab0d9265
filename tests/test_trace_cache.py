"""The trace cache: a trace file is parsed once, its loads memory-mapped on later reads, and an
entry that is stale, damaged or half-written is never trusted."""

import json
import os
import warnings

import numpy as np
import pytest
from conftest import SMALL_LAYOUT
from typer.testing import CliRunner

from tape.cli import app
from tape.trace import load_trace, write_expert_load_json
from tape.trace_cache import (
    CACHE_DIR_ENV,
    CACHE_MAX_MB_ENV,
    TraceCache,
    TraceCacheWarning,
    cached_read,
)


def _trace(tmp_path, name="trace.json", seed=0, steps=30):
    rng = np.random.default_rng(seed)
    loads = rng.poisson(5.0, size=(steps, 3, 8)).astype(float)
    path = tmp_path / name
    write_expert_load_json(loads, path)
    return path, loads


class CountingReader:
    """`load_trace`'s parse, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return load_trace(path, cache=False)


@pytest.fixture()
def cache(tmp_path):
    return TraceCache(tmp_path / "cache")


def test_a_trace_is_parsed_once_then_memory_mapped(tmp_path, cache):
    path, loads = _trace(tmp_path)
    read = CountingReader()
    first = cached_read(path, read, cache=cache)
    second = cached_read(path, read, cache=cache)
    assert read.calls == 1
    np.testing.assert_array_equal(first, loads)
    np.testing.assert_array_equal(second, loads)
    assert isinstance(second, np.memmap) and not second.flags.writeable
    assert len(cache.entries()) == 1
    # The same file by another (relative) name is the same entry.
    os.chdir(tmp_path)
    cached_read(type(path)(path.name), read, cache=cache)
    assert read.calls == 1


def test_a_changed_trace_is_parsed_again(tmp_path, cache):
    path, _ = _trace(tmp_path)
    read = CountingReader()
    cached_read(path, read, cache=cache)
    _, changed = _trace(tmp_path, seed=1)  # same name, new contents
    os.utime(path, ns=(0, 10**9))  # and a new modification time even on a coarse clock
    again = cached_read(path, read, cache=cache)
    assert read.calls == 2
    np.testing.assert_array_equal(again, changed)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "bad record", "no data"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, cache, damage):
    path, loads = _trace(tmp_path)
    read = CountingReader()
    cached_read(path, read, cache=cache)
    key = cache.entries()[0][2]
    data, meta = cache.folder / f"{key}.npy", cache.folder / f"{key}.json"
    if damage == "flip a byte":
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0x40  # a valid float64, another value: only the checksum tells
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-16])
    elif damage == "bad record":
        meta.write_text("{not json")
    else:
        data.unlink()
    result = cached_read(path, read, cache=cache)
    assert read.calls == 2
    np.testing.assert_array_equal(result, loads)
    # ...and the rebuilt entry is good again.
    np.testing.assert_array_equal(cached_read(path, read, cache=cache), loads)
    assert read.calls == 2


def test_the_least_recently_used_entries_are_evicted_first(tmp_path):
    paths = [_trace(tmp_path, f"t{index}.json", seed=index)[0] for index in range(3)]
    entry_bytes = 30 * 3 * 8 * 8 + 128 + 400  # data, .npy header, record (about)
    cache = TraceCache(tmp_path / "cache", max_bytes=2 * entry_bytes + 100)
    read = CountingReader()
    cached_read(paths[0], read, cache=cache)
    cached_read(paths[1], read, cache=cache)
    # Use t0 again, later than t1: t1 is now the least recently used.
    key0 = cache.key(paths[0].resolve(), paths[0].stat())
    os.utime(cache.folder / f"{key0}.json", (1, 1))
    cached_read(paths[1], read, cache=cache)  # a hit: t1's use time is now
    os.utime(cache.folder / f"{key0}.json", (2, 2))
    cached_read(paths[0], read, cache=cache)  # a hit: t0's use time is now, after t1's
    assert read.calls == 2
    cached_read(paths[2], read, cache=cache)  # no room for three: t1 goes
    keys = {key for _, _, key in cache.entries()}
    assert keys == {cache.key(p.resolve(), p.stat()) for p in (paths[0], paths[2])}
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes


def test_a_trace_larger_than_the_bound_is_not_kept(tmp_path):
    path, loads = _trace(tmp_path)
    cache = TraceCache(tmp_path / "cache", max_bytes=100)
    np.testing.assert_array_equal(cached_read(path, CountingReader(), cache=cache), loads)
    assert cache.entries() == []


def test_pieces_left_by_a_killed_run_are_removed(tmp_path, cache):
    cache.folder.mkdir()
    (cache.folder / ".abc.123.tmp.npy").write_bytes(b"partial")
    (cache.folder / "orphan.npy").write_bytes(b"no record")
    path, _ = _trace(tmp_path)
    cached_read(path, CountingReader(), cache=cache)
    names = sorted(file.name for file in cache.folder.iterdir())
    assert len(names) == 2 and all(not name.startswith(".") for name in names)
    assert "orphan.npy" not in names


def test_an_unwritable_cache_folder_warns_once_and_goes_on(tmp_path):
    path, loads = _trace(tmp_path)
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    cache = TraceCache(blocker / "cache")
    with pytest.warns(TraceCacheWarning, match="cannot be written .* TAPE_CACHE_DIR") as caught:
        result = cached_read(path, CountingReader(), cache=cache)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    np.testing.assert_array_equal(result, loads)


def test_formats_not_cached_are_read_directly(tmp_path, cache):
    path = tmp_path / "trace.npy"
    np.save(path, np.ones((4, 2, 3)))
    read = CountingReader()
    cached_read(path, read, cache=cache)
    cached_read(path, read, cache=cache)
    assert read.calls == 2 and not cache.folder.exists()


def test_the_environment_chooses_the_folder_and_the_bound(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv(CACHE_MAX_MB_ENV, "1.5")
    cache = TraceCache.from_environment()
    assert cache.folder == tmp_path / "mine" and cache.max_bytes == int(1.5 * 2**20)
    monkeypatch.setenv(CACHE_MAX_MB_ENV, "lots")
    with pytest.warns(TraceCacheWarning, match="TAPE_CACHE_MAX_MB='lots'"):
        assert TraceCache.from_environment().max_bytes > 2**30
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.delenv(CACHE_MAX_MB_ENV)
    assert TraceCache.from_environment().folder.name == "traces"


def test_the_cli_uses_the_cache_unless_told_not_to(tmp_path, monkeypatch):
    runner = CliRunner()
    path, _ = _trace(tmp_path)
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(folder))
    outputs = [tmp_path / f"placement{index}.json" for index in range(3)]
    arguments = ["place", "--trace", str(path), *SMALL_LAYOUT, "--output"]
    result = runner.invoke(app, [*arguments, str(outputs[0]), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert not folder.exists()
    first = runner.invoke(app, [*arguments, str(outputs[1])])
    assert first.exit_code == 0, first.output
    (entry,) = folder.glob("*.json")
    assert json.loads(entry.read_text())["source"] == str(path.resolve())
    second = runner.invoke(app, [*arguments, str(outputs[2])])  # from the cache
    assert second.exit_code == 0, second.output
    assert outputs[0].read_text() == outputs[1].read_text() == outputs[2].read_text()


def test_the_cli_warns_on_one_line_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    path, _ = _trace(tmp_path)
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        result = CliRunner().invoke(
            app, ["place", "--trace", str(path), *SMALL_LAYOUT, "--json"]
        )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: trace cache")
    assert "Traceback" not in result.output
