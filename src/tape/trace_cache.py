"""A cache of parsed trace files: a trace file is parsed once, then memory-mapped.

Parsing the public `expert-load.json` (250 MB) takes seconds on every command; its parsed loads
`[steps, L, E]` float64 are kept as a `.npy` file in the user's cache folder and memory-mapped on
the next run. An entry is keyed by the trace file's absolute path, size and modification time
(nanoseconds): a trace that is edited, replaced or touched is parsed again.

- Folder: `TAPE_CACHE_DIR` if set, else `platformdirs.user_cache_path("tape-moe") / "traces"`.
- Size: at most `TAPE_CACHE_MAX_MB` megabytes (default `DEFAULT_MAX_MB`); when a new entry would
  exceed it, the least recently used entries are evicted first. A trace larger than the bound
  is not cached.
- Trust: an entry is a `KEY.npy` and a `KEY.json` beside it (the source's path, size and
  modification time, the array's shape and a CRC-32 of its bytes). It is used only if all of
  these agree with the trace file and the `.npy` itself; a damaged, truncated or stale entry is
  removed and the trace parsed again. Entries are written to temporary names and renamed into
  place, the `.json` last, so a run killed while writing leaves no entry that looks whole.
- Failure: a cache folder that cannot be made or written is a `TraceCacheWarning` (one line: what
  failed and how to choose another folder) and the run goes on without the cache.

Only single-file formats whose parsing costs time are cached (`CACHED_SUFFIXES`); `.npy` and
`.npz` files are read directly, and folders of CSV files are small.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CACHED_SUFFIXES",
    "CACHE_DIR_ENV",
    "CACHE_MAX_MB_ENV",
    "DEFAULT_MAX_MB",
    "TraceCache",
    "TraceCacheWarning",
    "cached_read",
]

CACHE_DIR_ENV = "TAPE_CACHE_DIR"
"""Environment variable naming the cache folder."""
CACHE_MAX_MB_ENV = "TAPE_CACHE_MAX_MB"
"""Environment variable bounding the cache's size, in megabytes (2**20 bytes)."""
DEFAULT_MAX_MB = 4096
"""The cache's default bound: 4 GiB, about 16 public traces."""
CACHED_SUFFIXES = (".json", ".pt")
"""Trace file formats whose parsed loads are cached."""
_ENTRY_VERSION = 1
"""Bumped when the entry layout or a reader's output changes: older entries are never used."""


class TraceCacheWarning(UserWarning):
    """The trace cache could not be used; the run goes on without it."""


def _default_folder() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("tape-moe") / "traces"


def _max_bytes() -> int:
    text = os.environ.get(CACHE_MAX_MB_ENV)
    if text is None:
        return DEFAULT_MAX_MB * 2**20
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0 or megabytes == float("inf"):
        warnings.warn(
            f"{CACHE_MAX_MB_ENV}={text!r} is not a number of megabytes >= 0; using the default "
            f"{DEFAULT_MAX_MB}",
            TraceCacheWarning,
            stacklevel=3,
        )
        return DEFAULT_MAX_MB * 2**20
    return int(megabytes * 2**20)


@dataclass(frozen=True)
class TraceCache:
    """The cache folder and its size bound; `TraceCache.from_environment()` reads both.

    Attributes:
        folder: where entries live (made on the first write).
        max_bytes: the most bytes the entries may take together (0: nothing is kept).
    """

    folder: Path
    max_bytes: int = DEFAULT_MAX_MB * 2**20

    @classmethod
    def from_environment(cls) -> TraceCache:
        """`TAPE_CACHE_DIR` (else the user's cache folder) and `TAPE_CACHE_MAX_MB`."""
        folder = os.environ.get(CACHE_DIR_ENV)
        return cls(Path(folder) if folder else _default_folder(), _max_bytes())

    def key(self, path: Path, stat: os.stat_result) -> str:
        """The entry name of a trace file: a hash of its absolute path, size and mtime."""
        text = f"{_ENTRY_VERSION}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]

    def lookup(self, path: Path, stat: os.stat_result) -> np.ndarray | None:
        """The cached loads of `path` (memory-mapped, read-only), or None; a damaged or stale
        entry is removed."""
        key = self.key(path, stat)
        data, meta = self.folder / f"{key}.npy", self.folder / f"{key}.json"
        if not meta.is_file():
            return None
        loads = self._trusted(path, stat, data, meta)
        if loads is None:
            self._remove(key)
            return None
        try:
            os.utime(meta)  # recently used: evicted last
        except OSError:
            pass
        return loads

    def _trusted(
        self, path: Path, stat: os.stat_result, data: Path, meta: Path
    ) -> np.ndarray | None:
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
            expected = {
                "version": _ENTRY_VERSION,
                "source": str(path),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
            if any(record.get(name) != value for name, value in expected.items()):
                return None
            loads = np.load(data, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            return None
        if (
            loads.dtype != np.float64
            or list(loads.shape) != record.get("shape")
            or zlib.crc32(loads) != record.get("crc32")
        ):
            return None
        return loads

    def store(self, path: Path, stat: os.stat_result, loads: np.ndarray) -> None:
        """Keep `loads` (float64 [steps, L, E], checked) for `path`, evicting the least
        recently used entries to stay under the bound.

        Raises:
            OSError: the folder cannot be made or written (the entry is then absent).
        """
        loads = np.ascontiguousarray(loads, dtype=np.float64)
        if loads.nbytes > self.max_bytes:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._evict(self.max_bytes - loads.nbytes)
        key = self.key(path, stat)
        record = {
            "version": _ENTRY_VERSION,
            "source": str(path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "shape": list(loads.shape),
            "crc32": zlib.crc32(loads),
        }
        partial = f".{key}.{uuid.uuid4().hex[:12]}.tmp"
        data, meta = self.folder / f"{partial}.npy", self.folder / f"{partial}.json"
        try:
            np.save(data, loads, allow_pickle=False)
            meta.write_text(json.dumps(record), encoding="utf-8")
            os.replace(data, self.folder / f"{key}.npy")
            os.replace(meta, self.folder / f"{key}.json")
        finally:
            for leftover in (data, meta):
                leftover.unlink(missing_ok=True)

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) of every entry, least recently used first."""
        found = []
        for meta in self.folder.glob("*.json"):
            key = meta.stem
            try:
                used = meta.stat().st_mtime
                size = (self.folder / f"{key}.npy").stat().st_size + meta.stat().st_size
            except OSError:
                continue
            found.append((used, size, key))
        return sorted(found)

    def _evict(self, room: int) -> None:
        """Remove the least recently used entries until they take at most `room` bytes; also
        the pieces of entries that a killed run left half-written."""
        for stray in self.folder.glob("*.npy"):
            if stray.name.startswith(".") or not (self.folder / f"{stray.stem}.json").exists():
                stray.unlink(missing_ok=True)
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, key in entries:
            if total <= room:
                break
            self._remove(key)
            total -= size

    def _remove(self, key: str) -> None:
        for suffix in (".json", ".npy"):  # the .json first: no entry looks whole meanwhile
            try:
                (self.folder / f"{key}{suffix}").unlink(missing_ok=True)
            except OSError:
                pass


def cached_read(
    path: Path, read: Callable[[Path], np.ndarray], *, cache: TraceCache | None = None
) -> np.ndarray:
    """`read(path)` (a checked float64 [steps, L, E]), through the cache when `path` is a
    cached format: a hit is memory-mapped, a miss is read and stored.

    Args:
        path: a trace file.
        read: parses and checks `path`; called on a miss.
        cache: the cache to use; None reads `TraceCache.from_environment()`.
    """
    if path.suffix.lower() not in CACHED_SUFFIXES or not path.is_file():
        return read(path)
    path = path.resolve()
    cache = TraceCache.from_environment() if cache is None else cache
    stat = path.stat()
    found = cache.lookup(path, stat)  # never raises: an entry it cannot read is a miss
    if found is not None:
        return found
    loads = read(path)
    try:
        cache.store(path, stat, loads)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        warnings.warn(
            f"trace cache {cache.folder} cannot be written ({reason}); running without it (set "
            f"{CACHE_DIR_ENV} to a writable folder, or pass --no-cache)",
            TraceCacheWarning,
            stacklevel=2,
        )
    return loads
