"""Profiles of the policies' own calls, as the seed notebook profiled them (it used viztracer).

`profile_policies` replays each policy's calls on the windows (the protocol's calls: window i
with the placement before and the earlier windows) under pyinstrument, apart from the timed
comparison so that profiling never slows the runtimes it reports, and writes per policy
`POLICY_profile.html` (pyinstrument's interactive call tree) and `POLICY_profile.txt` (the same
tree as text). pyinstrument is optional (`pip install 'tape-moe[profile]'`) and imported here
only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tape.errors import ConfigError
from tape.layout import Layout
from tape.policies import parse_policy_spec
from tape.protocol import policy_source, replay
from tape.report import _file_stems

__all__ = ["profile_policies"]


def profile_policies(specs: Sequence[str], windows: np.ndarray, layout: Layout,
                     folder: Path) -> dict[str, dict[str, object]]:
    """Profile each policy's calls on `windows` [W, L, E] and write the profiles in `folder`.

    Args:
        specs: policies as `compare --policies` takes them ("tape:fast", ...).
        windows: the windows the comparison replays; W - 1 calls a policy.
        layout: the cluster.
        folder: an existing folder; files of the same names are replaced.

    Returns:
        Per spec: its two files (names relative to `folder`), its number of calls and the
        seconds they took under the profiler.

    Raises:
        ConfigError: pyinstrument is not installed.
    """
    try:
        from pyinstrument import Profiler
    except ModuleNotFoundError:
        raise ConfigError("--profile needs pyinstrument: pip install 'tape-moe[profile]'"
                          ) from None
    written: dict[str, dict[str, object]] = {}
    for spec, stem in _file_stems(list(specs)).items():
        name, params = parse_policy_spec(spec)
        source = policy_source(name, layout, params)
        profiler = Profiler(interval=0.0005)
        start = time.perf_counter()
        profiler.start()
        try:
            calls = len(replay(source, windows).placements)
        finally:
            profiler.stop()
        seconds = time.perf_counter() - start
        html, text = f"{stem}_profile.html", f"{stem}_profile.txt"
        (folder / html).write_text(profiler.output_html(), encoding="utf-8")
        # TAPE's own frames are shown also where TAPE is installed in site-packages, whose
        # frames pyinstrument hides as library code
        tree = profiler.output_text(unicode=False, color=False,
                                    processor_options={"show_regex": r".*[\\/]tape[\\/].*"})
        (folder / text).write_text(tree, encoding="utf-8")
        written[spec] = {"files": [html, text], "calls": calls, "seconds": seconds}
    return written
