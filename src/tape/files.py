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

from tape.errors import ConfigError

__all__ = [
    "STAGING_PREFIX",
    "CommitError",
    "atomic_output",
    "holds_files",
    "probe_writable",
    "require_new_folder",
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


STAGING_PREFIX = ".staging-"
"""Name prefix of a run's staging folder inside an existing --out (`staged_folder`); a hidden
sibling of a new --out is named `.NAME.staging-...`."""


def holds_files(folder: Path) -> bool:
    """Whether the existing `folder` holds anything but staging folders left by killed runs
    (`staged_folder`), which are not results."""
    return any(not entry.name.startswith(STAGING_PREFIX) for entry in Path(folder).iterdir())


class CommitError(OSError):
    """The staged results could not be moved into --out; `staging` still holds them."""

    def __init__(self, out: Path, staging: Path, reason: str) -> None:
        super().__init__(f"could not move the results into {out} ({reason}); they are in "
                         f"{staging}")
        self.staging = staging


def _staging_place(out: Path) -> tuple[Path, Path, bool]:
    """(out as an absolute path, symbolic links resolved; the folder to stage in; whether out
    is an existing folder)."""
    out = Path(os.path.realpath(out))
    inside = out.is_dir()
    token = uuid.uuid4().hex[:12]
    staging = out / f"{STAGING_PREFIX}{token}" if inside else out.parent / (
        f".{out.name}.staging-{token}")
    return out, staging, inside


def _make_parents(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; return those made, outermost first."""
    made = []
    for each in reversed([folder, *folder.parents]):
        if not each.exists():
            each.mkdir()
            made.append(each)
    return made


def _discard(staging: Path, made: list[Path]) -> None:
    """Remove the staging folder and the parents made for it (those still empty)."""
    shutil.rmtree(staging, ignore_errors=True)
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile
            break


def _open_staging(out: Path) -> tuple[Path, Path, bool, list[Path]]:
    """Make the staging folder for `out` (and the missing parents of a new `out`) and write and
    remove a probe file in it: (out, resolved; the staging folder; whether out is an existing
    folder; the parents made). OSError, with nothing left behind, if that cannot be done."""
    out, staging, inside = _staging_place(out)
    made = [] if inside else _make_parents(out.parent)
    try:
        staging.mkdir()
        probe = staging / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
    except BaseException:
        _discard(staging, made)
        raise
    return out, staging, inside, made


def probe_writable(out: Path) -> None:
    """Raise OSError unless results can be staged for `out` (`staged_folder`); nothing is left
    behind either way."""
    _, staging, _, made = _open_staging(out)
    _discard(staging, made)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a hidden staging folder for a run's results; they appear in `out` all together if
    the block succeeds, or not at all if it fails or is interrupted.

    `out` is taken as an absolute path with symbolic links resolved. A new `out` is staged
    beside it (`.NAME.staging-TOKEN` in the same parent, made with any missing parents), so
    that one rename moves the whole folder in; if another run made `out` meanwhile, nothing is
    mixed into it: CommitError, and the results stay in the staging folder. An existing `out`
    is staged inside it (`.staging-TOKEN`): its old files stay untouched until the block has
    succeeded, and then the new files replace them, moved one by one with Ctrl-C and SIGTERM
    held off (nothing moves if a staged file would meet a folder, or the reverse); if that
    fails, CommitError, and the files not moved stay in the staging folder. The staging
    folder (a fresh random name, never another run's) is made, and a probe file written into
    it and removed, before the block runs: an `out` that cannot be written raises OSError
    before any work. If the block fails, the staging folder goes, with the parents made for it.
    """
    out, staging, inside, made = _open_staging(out)
    try:
        yield staging
    except BaseException:
        _discard(staging, made)
        raise
    _commit(staging, out, inside)


def _commit(staging: Path, out: Path, inside: bool) -> None:
    """Move the staged files into `out` (the whole folder if `out` was new), with Ctrl-C and
    SIGTERM held off until the move is done; CommitError (the staging folder kept) if it
    cannot be done, checked before anything moves where a staged entry would meet an entry of
    the other kind (a file where a folder is, or the reverse)."""
    held: dict[int, Any] = {}
    arrived: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            held[signum] = signal.signal(signum, lambda number, frame: arrived.append(number))
        except ValueError:  # not the main thread, which alone receives signals
            break
    try:
        if inside:
            clash = _kind_clash(staging, out)
            if clash is not None:
                raise CommitError(out, staging, f"{clash} is in the way")
            _move_into(staging, out)
            staging.rmdir()
        elif os.path.lexists(out):  # made by another run meanwhile (rename would merge it)
            raise CommitError(out, staging, "another run made it meanwhile")
        else:
            os.rename(staging, out)
    except CommitError:
        raise
    except OSError as error:
        raise CommitError(out, staging, f"{error.strerror or error}; some files may have been "
                          "moved already") from None
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in arrived:
        raise SystemExit(128 + signal.SIGTERM)
    if arrived:
        raise KeyboardInterrupt


def _is_folder(path: Path) -> bool:
    """A real folder, not a symbolic link to one (a link is moved as it is)."""
    return path.is_dir() and not path.is_symlink()


def _kind_clash(source: Path, target: Path) -> Path | None:
    """The first entry of `target` that a staged entry of `source` (a file, or a folder) would
    meet as the other kind, or None."""
    for entry in source.iterdir():
        there = target / entry.name
        if not os.path.lexists(there):
            continue
        if _is_folder(entry) != _is_folder(there):
            return there
        if _is_folder(entry):
            clash = _kind_clash(entry, there)
            if clash is not None:
                return clash
    return None


def _move_into(source: Path, target: Path) -> None:
    """Move every file under `source` to the same place under `target`, replacing files."""
    for entry in source.iterdir():
        if _is_folder(entry):
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


def require_new_folder(path: Path, hint: str = "choose another --out") -> None:
    """ConfigError unless `path` is absent or an empty folder: a run never mixes its files with
    another's."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a folder; give a folder (new or empty) as --out")
    if path.exists() and holds_files(path):
        raise ConfigError(f"output folder {path} already holds files; {hint}")
