"""One run at a time into an --out folder: a lock beside it, and the staging a killed run left.

A command that writes --out holds `.NAME.tape-lock` in --out's parent folder (an advisory
`flock` on a file that holds the run's process id) from its first check of --out to its last
write. A second run into the same folder, while the first is writing, is refused with a
one-line error naming the first run's process. The kernel drops the lock when its process dies
however it dies (SIGKILL included), so a lock file left by a killed run is stale: the next run
finds no live holder (on a file system without `flock`, no live process of the id the file
holds), takes it over, and removes the staging folders the killed run left
(`tape.files.staged_folder`: `.staging-*` inside --out, `.NAME.staging-*` beside it).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tape.errors import ConfigError
from tape.files import STAGING_PREFIX

__all__ = ["lock_path", "out_lock"]


def lock_path(out: Path) -> Path:
    """The lock file of the --out folder `out` (absolute, links resolved): beside it."""
    out = Path(os.path.realpath(out))
    return out.parent / f".{out.name}.tape-lock"


def _holder(descriptor: int) -> str:
    """The process id written in a held lock file, for the message."""
    try:
        text = os.pread(descriptor, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"


def _holder_alive(descriptor: int) -> bool:
    """Whether the process whose id a lock file holds is alive (and not this one)."""
    text = _holder(descriptor).removeprefix("process ")
    if not text.isdigit() or int(text) == os.getpid():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _acquire(path: Path, out: Path) -> int:
    """The descriptor of `path`, locked; ConfigError if a live run holds it."""
    for _ in range(10):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # a file system without flock (some network ones): the PID decides
            held = _holder_alive(descriptor)
        if held:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise ConfigError(f"--out {out} is being written by another tape run ({holder}); "
                              "wait for it to finish or choose another folder")
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its holder removed between our open and our lock
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, str(os.getpid()).encode(), 0)
            return descriptor
        os.close(descriptor)
    raise ConfigError(f"--out {out}: could not take its lock {path}; try again")


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging folders of runs into `out` that were killed before they finished."""
    leftovers = list(out.parent.glob(f".{out.name}.staging-*"))
    if out.is_dir():
        leftovers += out.glob(f"{STAGING_PREFIX}*")
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def out_lock(out: Path | None) -> Iterator[None]:
    """Hold --out's lock for the block (nothing without --out); ConfigError, before any work,
    if another run is writing into it. Taking the lock removes what killed runs left there.
    Missing parents of --out are made (the run makes them anyway); on failure, the empty ones
    go again."""
    if out is None:
        yield
        return
    out = Path(os.path.realpath(out))
    made = []
    try:
        for folder in reversed([out.parent, *out.parent.parents]):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        path = lock_path(out)
        descriptor = _acquire(path, out)
    except OSError as error:
        _remove_empty(made)
        raise ConfigError(f"cannot write to --out {out}: {error.strerror or error}") from None
    except BaseException:
        _remove_empty(made)
        raise
    try:
        _remove_stale_staging(out)
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(descriptor)
        _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # it holds the results now, or something else
            break
