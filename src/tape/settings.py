"""How an evaluation is set up: one typed, strict settings object for every command.

`Settings` holds what `tape evaluate`, `evaluate-dir`, `compare`, `place`, `evolve` and `tune`
share, and what the evolution evaluator reads from `TAPE_*` variables (OpenEvolve loads the
evaluator file afresh in every worker process): where the loads come from (a trace file, a
windows file or the synthetic trace), the model, cluster and layout, the scoring version, and
the sandbox's limits. Every field has one default, here; the layout's come from the preset data:
groups from the model (1 where its routing is not group-limited), nodes from the cluster's GPUs
per node, slots G * (ceil(E / G) + 1) with E the trace's experts.

`Settings.prepare()` checks everything and reads the loads once: a `Setup` (layout, presets and
windows) that every command and the evaluator use. `to_environment()` and `from_environment()`
convert to and from `TAPE_*` variables; an unknown `TAPE_*` variable is an error, so a typo
cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tape.errors import MAX_INTEGER, ConfigError, LayoutError, TraceError, checked_integer, counted
from tape.layout import Layout, default_replicas
from tape.presets import ClusterSpec, ModelSpec, load_config

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENVIRONMENT",
    "OTHER_VARIABLES",
    "SMALL_SYNTHETIC",
    "Settings",
    "Setup",
    "flag_names",
]

DEFAULT_TIMEOUT_S = 30.0
"""Seconds one call of a program may take: far above any placement policy's (milliseconds),
short enough that a hung candidate costs an evolution little."""

ENVIRONMENT: dict[str, str] = {
    "version": "TAPE_VERSION",
    "trace": "TAPE_TRACE",
    "windows_file": "TAPE_WINDOWS",
    "interval": "TAPE_INTERVAL",
    "seed": "TAPE_SEED",
    "synthetic_model": "TAPE_SYNTHETIC_MODEL",
    "synthetic_steps": "TAPE_SYNTHETIC_STEPS",
    "synthetic_layers": "TAPE_SYNTHETIC_LAYERS",
    "synthetic_experts": "TAPE_SYNTHETIC_EXPERTS",
    "replicas": "TAPE_REPLICAS",
    "groups": "TAPE_GROUPS",
    "nodes": "TAPE_NODES",
    "gpus": "TAPE_GPUS",
    "model": "TAPE_MODEL",
    "cluster": "TAPE_CLUSTER",
    "config": "TAPE_CONFIG",
    "dispatch": "TAPE_DISPATCH",
    "timeout_s": "TAPE_TIMEOUT",
    "memory_mb": "TAPE_MEMORY_MB",
    "budget_s": "TAPE_BUDGET",
    "isolation": "TAPE_ISOLATION",
    "cache": "TAPE_TRACE_CACHE",
}
"""Each setting's environment variable."""

OTHER_VARIABLES = frozenset({"TAPE_CACHE_DIR", "TAPE_CACHE_MAX_MB", "TAPE_EPLB_POLICY"})
"""`TAPE_*` variables that other parts of TAPE read (the trace cache, the engine plugins)."""

_INTEGER_FIELDS = frozenset({
    "interval", "seed", "synthetic_steps", "synthetic_layers", "synthetic_experts", "replicas",
    "groups", "nodes", "gpus", "memory_mb",
})
_FLOAT_FIELDS = frozenset({"timeout_s", "budget_s"})
_PATH_FIELDS = ("trace", "windows_file", "config")


@dataclass(frozen=True)
class Setup:
    """What every scoring command needs: layout, presets, dispatch and the windowed loads.

    Attributes:
        layout: the cluster, every default resolved.
        model, cluster: the cost model's presets (with the config file's overrides).
        dispatch: "locality" or "uniform".
        windows: [W, L, E] float64, read-only: the windowed loads.
        described: one line naming where the windows come from and their shape.
        interval: forward steps per window.
        window_steps: the forward steps in each window (the last may be shorter).
    """

    layout: Layout
    model: ModelSpec
    cluster: ClusterSpec
    dispatch: str
    windows: np.ndarray
    described: str
    interval: int
    window_steps: tuple[int, ...]

    def setting(self) -> str:
        """The model, the cluster and the layout in words, for a table's heading."""
        layout = self.layout
        return (f"{self.model.name} on {self.cluster.name}: {counted(layout.num_gpus, 'GPU')} "
                f"on {counted(layout.num_nodes, 'node')}, {counted(layout.num_replicas, 'slot')}; "
                f"{self.dispatch} dispatch")

    def manifest(self) -> dict[str, Any]:
        """The settings of a run, for the manifest beside its results."""
        layout = self.layout
        return {
            "trace": self.described, "interval": self.interval, "dispatch": self.dispatch,
            "layout": {"replicas": layout.num_replicas, "groups": layout.num_groups,
                       "nodes": layout.num_nodes, "gpus": layout.num_gpus},
            "model": dataclasses.asdict(self.model), "cluster": dataclasses.asdict(self.cluster),
        }


@dataclass(frozen=True)
class Settings:
    """How programs and policies are scored. Every field has an environment variable.

    Attributes:
        version: scoring version: 0, 2, 3, 4 (the seed's) or "realistic".
        trace: expert-load trace file or folder; None (and no `windows_file`) means the
            synthetic trace of `model`.
        windows_file: a `.npz` holding `windows` [W, L, E] and `steps` [W], what `tape evolve`
            writes once so that every worker reads the same windows; excludes `trace`.
        interval: forward steps per window.
        seed, synthetic_model: the synthetic trace's seed and model (`tape.synthetic`); not
            with a trace file.
        synthetic_steps: forward steps of the synthetic trace.
        synthetic_layers, synthetic_experts: the synthetic trace's shape instead of the
            model's (small problems for quick runs and tests), or None.
        replicas, groups, nodes, gpus: the layout (S, expert groups, N, G); None takes the
            default from the presets (module doc).
        model, cluster: model and cluster presets (None: the config file's `preset:`, else
            deepseek-v3 and h800).
        config: a YAML/JSON file overriding preset fields (`model:` / `cluster:` sections).
        dispatch: token dispatch of the cost model: locality or uniform.
        timeout_s: seconds one call of a program may take before its process is killed.
        memory_mb: megabytes a program may allocate.
        budget_s: seconds all calls of one program may take together (None: the sandbox's
            default, `tape.sandbox.BUDGET_TIMEOUTS` x `timeout_s`).
        isolation: the sandbox's isolation: auto, strict or partial (`tape.isolation`).
        cache: read a trace file through the trace cache (`tape.trace_cache`).
    """

    version: int | str = 0
    trace: Path | None = None
    windows_file: Path | None = None
    interval: int = 100
    seed: int = 0
    synthetic_model: str = "calibrated"
    synthetic_steps: int = 1200
    synthetic_layers: int | None = None
    synthetic_experts: int | None = None
    replicas: int | None = None
    groups: int | None = None
    nodes: int | None = None
    gpus: int = 32
    model: str | None = None
    cluster: str | None = None
    config: Path | None = None
    dispatch: str = "locality"
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = 4096
    budget_s: float | None = None
    isolation: str = "auto"
    cache: bool = True

    def __post_init__(self) -> None:
        from tape.dispatch import check_dispatch
        from tape.isolation import check_isolation
        from tape.protocol import parse_version
        from tape.synthetic import trace_model

        object.__setattr__(self, "version", parse_version(self.version))
        for name in _PATH_FIELDS:  # absolute: workers and resumes agree
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).resolve())
        if self.trace is not None and self.windows_file is not None:
            raise ConfigError("give either a trace or a windows file, not both")
        checked_integer(self.interval, "--interval", TraceError)
        for name in ("synthetic_steps", "synthetic_layers", "synthetic_experts"):
            if getattr(self, name) is not None:
                checked_integer(getattr(self, name), name, ConfigError)
        checked_integer(self.memory_mb, "--memory-mb", ConfigError)
        for name in ("replicas", "groups", "nodes", "gpus"):  # named as the flags
            if getattr(self, name) is not None:
                checked_integer(getattr(self, name), f"--{name}", LayoutError)
        checked_integer(self.seed, "--seed", TraceError, minimum=0)
        if self.seed > MAX_INTEGER:
            raise TraceError(f"--seed must be at most {MAX_INTEGER}, got {self.seed}")
        trace_model(self.synthetic_model)  # TraceError naming the known models
        # A windows file may hold the synthetic trace's windows (tape evolve's workers): its
        # model and seed are then a record of where they came from.
        if self.trace is not None and self.synthetic_model != "calibrated":
            raise TraceError("--synthetic-model applies to the synthetic trace, not to --trace")
        if self.trace is not None and self.seed != 0:  # runs with --seed 1, 2, ... all alike
            raise TraceError("--seed applies to the synthetic trace, not to --trace")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(f"budget_s must be positive, got {self.budget_s!r}")
        check_isolation(self.isolation)
        check_dispatch(self.dispatch)
        # What the layout can tell before the presets and the loads: S a multiple of G, G of N.
        Layout(self.replicas or self.gpus, self.groups or 1, self.nodes or 1, self.gpus)

    # -- conversions ------------------------------------------------------------------------

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `TAPE_*` variables (defaults for those unset); ConfigError on typos."""
        environ = os.environ if environ is None else environ
        known = set(ENVIRONMENT.values()) | OTHER_VARIABLES
        unknown = sorted(name for name in environ if name.startswith("TAPE_") and name not in known)
        if unknown:
            raise ConfigError(
                f"unknown evaluation variable(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(ENVIRONMENT.values()))}"
            )
        values = {
            name: _parse(name, environ[variable], variable)
            for name, variable in ENVIRONMENT.items()
            if variable in environ
        }
        return cls(**values)

    def to_environment(self) -> dict[str, str]:
        """The `TAPE_*` variables that reproduce these settings (unset fields left out)."""
        return {
            ENVIRONMENT[name]: str(int(value) if isinstance(value, bool) else value)
            for name, value in dataclasses.asdict(self).items()
            if value is not None
        }

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict (paths as strings)."""
        return {
            name: str(value) if isinstance(value, Path) else value
            for name, value in dataclasses.asdict(self).items()
        }

    # -- what the settings describe ---------------------------------------------------------

    def specs(self) -> tuple[ModelSpec, ClusterSpec]:
        """The model and cluster presets, with the config file's overrides."""
        return load_config(self.config, model=self.model, cluster=self.cluster)

    def prepare(self, *, replay: bool = True) -> Setup:
        """Check the settings against the presets and read the loads, once (cached).

        Args:
            replay: the windows must be the 2 or more a replay needs (else one is enough, as
                for `tape place`; a one-step trace is then one window).

        Raises:
            TapeError subclasses naming what is wrong (flags by their command-line names).
        """
        return _prepared(self, replay)

    def layout(self) -> Layout:
        """The layout, every default resolved (reads the loads for the default slots)."""
        return self.prepare().layout

    def windows(self) -> np.ndarray:
        """The windowed loads [W, L, E] float64, read-only, checked against the layout."""
        return self.prepare().windows

    def window_steps(self) -> tuple[int, ...]:
        """Forward steps in each window (the last one may be shorter than `interval`)."""
        return self.prepare().window_steps

    def save_windows(self, path: Path) -> None:
        """Write the windows and their step counts as a `windows_file` (.npz)."""
        np.savez(path, windows=self.windows(), steps=np.array(self.window_steps()))

    def describe_source(self) -> str:
        """One line naming where the windows come from."""
        if self.windows_file is not None:
            return f"windows file {self.windows_file}"
        return self.prepare().described


SMALL_SYNTHETIC: dict[str, int] = {
    "synthetic_steps": 600,
    "synthetic_layers": 4,
    "synthetic_experts": 32,
    "replicas": 48,
    "groups": 4,
    "nodes": 2,
    "gpus": 8,
}
"""A small synthetic problem (6 windows of 100 steps) for quick runs and tests."""


def _parse(name: str, text: str, variable: str) -> Any:
    """An environment variable's text as the setting's type (the dataclass checks the rest)."""
    try:
        if name in _INTEGER_FIELDS:
            return int(text)
        if name in _FLOAT_FIELDS:
            return float(text)
    except ValueError:
        kind = "an integer" if name in _INTEGER_FIELDS else "a number"
        raise ConfigError(f"{variable}={text!r} is not {kind}") from None
    if name == "cache":
        if text not in ("0", "1"):
            raise ConfigError(f"{variable}={text!r} is not 0 or 1")
        return text == "1"
    return text


_FLAGS = {"num_replicas": "--replicas", "num_groups": "--groups", "num_nodes": "--nodes",
          "num_gpus": "--gpus"}


def flag_names(message: str) -> str:
    """`message` with the layout's argument names (num_gpus, ...) as the flags that set them
    (--gpus, ...): the library's messages name its arguments, a CLI user typed flags."""
    return re.sub(r"\b(?:num_replicas|num_groups|num_nodes|num_gpus)\b",
                  lambda match: _FLAGS[match[0]], message)


def _nodes(settings: Settings, cluster: ClusterSpec) -> int:
    """--nodes, or else G / the cluster preset's GPUs per node (1 node for a smaller G)."""
    if settings.nodes is not None:
        return settings.nodes
    if settings.gpus <= cluster.gpus_per_node:
        return 1
    if settings.gpus % cluster.gpus_per_node:
        raise LayoutError(
            f"--gpus {settings.gpus} is not a multiple of the {cluster.name} preset's "
            f"{cluster.gpus_per_node} GPUs per node; give --nodes"
        )
    return settings.gpus // cluster.gpus_per_node


def _groups(settings: Settings, model: ModelSpec) -> int:
    """--groups, or else the model's groups (1 without group-limited routing); LayoutError for
    --groups on a model whose routing has no groups."""
    if settings.groups is None:
        return model.layout_groups
    if model.num_groups is None and settings.groups != 1:
        raise LayoutError(f"--groups {settings.groups}: the {model.name} model routes without "
                          "expert groups; leave --groups out (or give the model num_groups and "
                          "topk_groups in --config)")
    return settings.groups


@lru_cache(maxsize=8)
def _prepared(settings: Settings, replay: bool) -> Setup:
    # S a multiple of G and G of N were checked when the settings were made (a derived N
    # divides G); what is left needs the presets and the loads
    from tape.protocol import check_windows
    from tape.trace import describe

    model, cluster = settings.specs()
    nodes = _nodes(settings, cluster)
    groups = _groups(settings, model)
    if settings.windows_file is not None:
        windows, steps, described = _saved_windows(settings.windows_file)
    else:
        loads, source = _loads(settings, model, groups)
        windows, steps = _windowed(loads, settings.interval, replay)
        described = (f"{source}: {describe(loads)}, {counted(windows.shape[0], 'window')} of "
                     f"{counted(settings.interval, 'step')}")
    replicas = settings.replicas
    if replicas is None:
        replicas = default_replicas(windows.shape[2], settings.gpus)
    layout = Layout(replicas, groups, nodes, settings.gpus)
    windows = check_windows(windows, layout, replay=replay)
    windows.setflags(write=False)
    if settings.config is not None:
        _check_model_shape(settings.config, windows.shape[1:], groups)
    return Setup(layout, model, cluster, settings.dispatch, windows, described, settings.interval,
                 steps)


def _loads(settings: Settings, model: ModelSpec, groups: int) -> tuple[np.ndarray, str]:
    """The trace's loads [steps, L, E] and where they come from, in words."""
    if settings.trace is not None:
        from tape.trace import load_trace

        return load_trace(settings.trace, cache=settings.cache), str(settings.trace)
    from tape.synthetic import model_trace, trace_model

    shape = {}
    if settings.synthetic_layers is not None:
        shape["num_layers"] = settings.synthetic_layers
    if settings.synthetic_experts is not None:
        shape["num_experts"] = settings.synthetic_experts
    spec = dataclasses.replace(model, **shape) if shape else model
    try:
        loads = model_trace(spec, num_steps=settings.synthetic_steps, seed=settings.seed,
                            model=trace_model(settings.synthetic_model),
                            num_groups=None if spec.num_groups is None else groups)
    except TraceError as error:
        raise TraceError(f"cannot make the synthetic {model.name} trace with --groups {groups} "
                         f"and --seed {settings.seed}: {flag_names(str(error))}") from None
    return loads, (f"synthetic {model.name} trace ({settings.synthetic_model} model, seed "
                   f"{settings.seed})")


def _windowed(loads: np.ndarray, interval: int, replay: bool
              ) -> tuple[np.ndarray, tuple[int, ...]]:
    """`loads` cut into windows of `interval` steps, and the steps in each."""
    from tape.trace import window_loads

    # one step is one window where no replay is made (`tape place`)
    windowed = loads if not replay and loads.shape[0] == 1 else window_loads(loads, interval)
    total = loads.shape[0]
    steps = tuple(min(interval, total - start) for start in range(0, total, interval))
    return windowed, steps


def _saved_windows(path: Path) -> tuple[np.ndarray, tuple[int, ...], str]:
    try:
        with np.load(path, allow_pickle=False) as saved:
            windows, steps = saved["windows"], tuple(int(n) for n in saved["steps"])
    except (OSError, ValueError, KeyError) as error:
        raise TraceError(f"cannot read windows file {path}: {error}") from None
    if len(steps) != len(windows):
        raise TraceError(
            f"windows file {path} has {len(windows)} windows but {len(steps)} step counts"
        )
    return windows, steps, f"windows file {path}"


def _check_model_shape(config: Path, shape: tuple[int, ...], groups: int) -> None:
    """ConfigError if the config file's model section sets a shape (layers, experts, groups)
    other than the trace's and --groups: the cost model takes the shape from those, so the
    file's value would be ignored without a word."""
    from tape.presets import read_mapping_file

    model = read_mapping_file(config, "config file").get("model") or {}
    for key, actual, source in (("num_layers", shape[0], "the trace's layers"),
                                ("num_experts", shape[1], "the trace's experts"),
                                ("num_groups", groups, "--groups")):
        if key in model and model[key] != actual:
            raise ConfigError(f"config file {config}: model {key} is {model[key]!r} but "
                              f"{source} are {actual}; the cost model takes the shape from the "
                              f"trace and the flags: fix or remove {key}")
