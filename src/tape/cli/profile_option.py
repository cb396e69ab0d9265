"""`tape compare --profile DIR`: a profile of each policy's calls (`tape.profiling`), in DIR.

DIR is new or empty (or `--overwrite`), and never `--out`'s folder: it receives
`POLICY_profile.html`, `POLICY_profile.txt` and a `manifest.json` naming them; `--out`'s
manifest names them too. The files appear all together or not at all (`staged_folder`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from tape import __version__
from tape.cli.common import Setup, parse_out
from tape.errors import ConfigError
from tape.files import CommitError, holds_files, staged_folder, to_json_text

__all__ = ["ProfileOption", "check_profile_folder", "write_profiles"]

ProfileOption = Annotated[
    Path | None,
    typer.Option("--profile", parser=parse_out, metavar="<path>",
                 help="Write here a profile of each policy's calls (pyinstrument: an HTML call "
                 "tree and its text), made apart from the timed run, and a manifest naming "
                 "them."),
]


def check_profile_folder(profile: Path | None, out: Path | None, overwrite: bool) -> None:
    """ConfigError, before any work, for a --profile that cannot be written as asked."""
    if profile is None:
        return
    if out is not None and os.path.realpath(out) == os.path.realpath(profile):
        raise ConfigError(f"--profile {profile} is --out's folder; give it a folder of its own")
    if profile.exists() and not profile.is_dir():
        raise ConfigError(f"--profile {profile} is a file; give a folder (new or empty)")
    if profile.is_dir() and holds_files(profile) and not overwrite:
        raise ConfigError(f"--profile {profile} already holds files; choose a new or empty "
                          f"folder, or pass --overwrite to replace its files")


def write_profiles(profile: Path, specs: list[str], setup: Setup,
                   manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Profile `specs` on the setup's windows into `profile` with a manifest (`manifest` plus
    what was profiled); return each spec's files as paths under `profile`."""
    from tape.profiling import profile_policies

    try:
        with staged_folder(profile) as staging:
            profiles = profile_policies(specs, setup.windows, setup.layout, staging)
            (staging / "manifest.json").write_text(to_json_text({
                "command": "compare --profile", "tape_version": __version__, **manifest,
                "profiler": "pyinstrument", "profiles": profiles}))
    except CommitError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"cannot write --profile {profile}: {error.strerror or error}"
                          ) from None
    return {spec: [str(profile / name) for name in entry["files"]]
            for spec, entry in profiles.items()}
