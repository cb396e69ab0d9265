"""Writing results: every file appears whole or not at all."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_output",
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
