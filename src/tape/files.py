"""Writing results: every file appears whole or not at all."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_output",
    "staged_folder",
    "to_json_text",
    "write_json_atomic",
    "write_records_csv",
    "write_table_csv",
]


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    The file gets the permissions a plain `open(path, "w")` gives (0o666 less the umask), not
    `tempfile.mkstemp`'s owner-only 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a hidden staging folder for a run's results; they appear in `out` all together if
    the block succeeds, or not at all if it fails or is interrupted.

    A new `out` is staged beside it (`.NAME.staging-PID` in the same parent, made with any
    missing parents), so that one rename moves the whole folder in. An existing `out` is staged
    inside it (`.staging-PID`): its old files stay untouched until the block has succeeded, and
    then the new files replace them, moved one by one with Ctrl-C held off. The staging folder
    is made, and a probe file written into it and removed, before the block runs: an `out` that
    cannot be written raises OSError before any work. On failure the staging folder goes, with
    the parents made for it.
    """
    out = Path(out)
    inside = out.is_dir()
    parent = out if inside else Path(os.path.abspath(out)).parent
    staging = parent / (f".staging-{os.getpid()}" if inside
                        else f".{out.name}.staging-{os.getpid()}")
    made: list[Path] = []  # folders made for the run, outermost first
    try:
        for folder in reversed([parent, *parent.parents]):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run with this pid
        staging.mkdir()
        probe = staging / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        yield staging
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:  # something else was put there meanwhile
                break
        raise


def _commit(staging: Path, out: Path) -> None:
    """Move the staged files into `out` (the whole folder if `out` does not exist), with
    Ctrl-C held off."""
    try:
        held = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread, which alone receives signals
        held = None
    try:
        if out.is_dir():
            _move_into(staging, out)
            staging.rmdir()
        else:
            os.rename(staging, out)
    finally:
        if held is not None:
            signal.signal(signal.SIGINT, held)


def _move_into(source: Path, target: Path) -> None:
    """Move every file under `source` to the same place under `target`, replacing files."""
    for entry in source.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            (target / entry.name).mkdir(exist_ok=True)
            _move_into(entry, target / entry.name)
            entry.rmdir()
        else:
            os.replace(entry, target / entry.name)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def to_json_text(data: Any) -> str:
    """`data` as JSON text, numpy values included."""
    return json.dumps(data, default=_json_default)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, never leaving a half-written file."""
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def write_table_csv(path: Path, rows: np.ndarray, columns: Sequence[str], index_name: str) -> None:
    """Write a 2-D array as CSV with a header and a leading index column."""
    rows = np.asarray(rows)
    lines = [",".join([index_name, *columns])]
    lines += [",".join([str(i), *(repr(float(v)) for v in row)]) for i, row in enumerate(rows)]
    with atomic_output(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n")


def _csv_cell(value: str | float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def write_records_csv(
    path: Path, columns: Sequence[str], rows: Iterable[Sequence[str | float | None]]
) -> None:
    """Write rows of mixed cells as CSV under a header, never leaving a half-written file.

    Cells: text as it is (quoted where CSV needs it), integers as integers, floats in full
    (`repr`), None as an empty cell (a value that does not exist, not a zero).
    """
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_csv_cell(value) for value in row] for row in rows)
    with atomic_output(path) as temporary:
        temporary.write_text(text.getvalue())
