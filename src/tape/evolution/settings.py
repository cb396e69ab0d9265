"""What a candidate program is scored on: version, windows, layout, limits and cost-model presets.

`tape evolve`, `tape tune` and the OpenEvolve evaluator share one `EvaluationSettings`. OpenEvolve
loads the evaluator file afresh in every worker process, so the settings travel as environment
variables (`TAPE_VERSION`, `TAPE_TRACE`, ...: see `ENVIRONMENT`); `to_environment()` and
`from_environment()` convert both ways. An unknown `TAPE_*` variable is an error, so a typo
cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tape.errors import ConfigError, TraceError, checked_integer
from tape.files import holds_files
from tape.layout import Layout
from tape.presets import ClusterSpec, ModelSpec, load_config

__all__ = ["ENVIRONMENT", "SMALL_SYNTHETIC", "EvaluationSettings", "require_new_folder"]

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
    "timeout_s": "TAPE_TIMEOUT",
    "memory_mb": "TAPE_MEMORY_MB",
    "budget_s": "TAPE_BUDGET",
    "isolation": "TAPE_ISOLATION",
    "moe_model": "TAPE_MOE_MODEL",
    "cluster": "TAPE_CLUSTER",
    "presets": "TAPE_PRESETS",
    "dispatch": "TAPE_DISPATCH",
}
"""Each setting's environment variable."""


@dataclass(frozen=True)
class EvaluationSettings:
    """How candidate programs are scored. Every field has an environment variable (ENVIRONMENT).

    Attributes:
        version: scoring version: 0, 2, 3, 4 (the seed's) or "realistic".
        trace: expert-load trace file or folder; None with no `windows_file` means the built-in
            synthetic trace.
        windows_file: a `.npz` holding `windows` [W, L, E] (windowed loads) and `steps` [W]
            (forward steps in each window), what `tape evolve` writes once so that every worker
            reads the same windows without parsing the trace again; excludes `trace`.
        interval: forward steps per window.
        seed: seed of the synthetic trace.
        synthetic_model: the synthetic trace's model, a name in `tape.synthetic.TRACE_MODELS`
            ("calibrated", the default, or "surges"); not with a trace file (with a windows
            file, the model its windows were made with).
        synthetic_steps, synthetic_layers, synthetic_experts: the synthetic trace's shape.
        replicas, groups, nodes, gpus: the layout (S, expert groups, N, G).
        timeout_s: seconds one call of the program may take before its process is killed.
        memory_mb: megabytes the program may allocate.
        budget_s: seconds all calls of one program may take together (None: the sandbox's
            default, `tape.sandbox.BUDGET_TIMEOUTS` x `timeout_s`).
        isolation: the sandbox's isolation setting: auto, strict or partial (`tape.isolation`).
        moe_model, cluster: model and cluster presets of the realistic cost model (None: the
            defaults, deepseek-v3 and h800).
        presets: a YAML/JSON file overriding preset fields (`model:` / `cluster:` sections).
        dispatch: token dispatch of the realistic cost model: locality or uniform.
    """

    version: int | str = 0
    trace: Path | None = None
    windows_file: Path | None = None
    interval: int = 100
    seed: int = 0
    synthetic_model: str = "calibrated"
    synthetic_steps: int = 1200
    synthetic_layers: int = 58
    synthetic_experts: int = 256
    replicas: int = 288
    groups: int = 8
    nodes: int = 4
    gpus: int = 32
    timeout_s: float = 10.0
    memory_mb: int = 4096
    budget_s: float | None = None
    isolation: str = "auto"
    moe_model: str | None = None
    cluster: str | None = None
    presets: Path | None = None
    dispatch: str = "locality"

    def __post_init__(self) -> None:
        from tape.dispatch import DISPATCH_POLICIES
        from tape.protocol import parse_version

        object.__setattr__(self, "version", parse_version(self.version))
        for name in ("trace", "windows_file", "presets"):  # absolute: workers and resumes agree
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).resolve())
        if self.trace is not None and self.windows_file is not None:
            raise ConfigError("give either a trace or a windows file, not both")
        for name in ("interval", "synthetic_steps", "synthetic_layers", "synthetic_experts",
                     "memory_mb"):
            checked_integer(getattr(self, name), name, ConfigError)
        checked_integer(self.seed, "seed", ConfigError, minimum=0)
        from tape.synthetic import trace_model

        try:
            trace_model(self.synthetic_model)
        except TraceError as error:
            raise ConfigError(str(error)) from None
        # A windows file may hold the synthetic trace's windows (tape evolve's workers): its
        # model is then a record of where they came from. A trace file has no synthetic model.
        if self.synthetic_model != "calibrated" and self.trace is not None:
            raise ConfigError("a synthetic model applies to the synthetic trace only, not to a "
                              "trace file")
        if self.seed != 0 and self.trace is not None:  # as --seed with --trace on the CLI
            raise ConfigError(f"a seed applies to the synthetic trace only, not to a trace file "
                              f"(got seed {self.seed})")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(f"budget_s must be positive, got {self.budget_s!r}")
        from tape.isolation import check_isolation

        check_isolation(self.isolation)
        if self.dispatch not in DISPATCH_POLICIES:
            known = ", ".join(DISPATCH_POLICIES)
            raise ConfigError(f"unknown dispatch {self.dispatch!r}; expected one of {known}")
        self.layout()  # raises LayoutError naming the broken constraint

    # -- conversions ------------------------------------------------------------------------

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> EvaluationSettings:
        """Settings from `TAPE_*` variables (defaults for those unset); ConfigError on typos."""
        environ = os.environ if environ is None else environ
        known = set(ENVIRONMENT.values())
        unknown = sorted(name for name in environ if name.startswith("TAPE_") and name not in known)
        if unknown:
            raise ConfigError(
                f"unknown evaluation variable(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(known))}"
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
            ENVIRONMENT[name]: str(value)
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

    def layout(self) -> Layout:
        return Layout(
            num_replicas=self.replicas, num_groups=self.groups, num_nodes=self.nodes,
            num_gpus=self.gpus,
        )

    def specs(self) -> tuple[ModelSpec, ClusterSpec]:
        """Model and cluster of the realistic cost model."""
        return load_config(self.presets, model=self.moe_model, cluster=self.cluster)

    def windows(self) -> np.ndarray:
        """The windowed loads [W, L, E] float64, validated against the layout (cached)."""
        return _windows(self)[0]

    def window_steps(self) -> tuple[int, ...]:
        """Forward steps in each window (the last one may be shorter than `interval`)."""
        return _windows(self)[1]

    def save_windows(self, path: Path) -> None:
        """Write the windows and their step counts as a `windows_file` (.npz)."""
        np.savez(path, windows=self.windows(), steps=np.array(self.window_steps()))

    def describe_source(self) -> str:
        """One line naming where the windows come from."""
        if self.windows_file is not None:
            return f"windows file {self.windows_file}"
        if self.trace is not None:
            return f"trace {self.trace}, windows of {self.interval} steps"
        return (
            f"synthetic trace ({self.synthetic_model} model, seed {self.seed}, "
            f"{self.synthetic_steps} steps x "
            f"{self.synthetic_layers} layers x {self.synthetic_experts} experts), windows of "
            f"{self.interval} steps"
        )


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


def require_new_folder(path: Path, hint: str = "choose another --out") -> None:
    """ConfigError unless `path` is absent or an empty folder: a run never mixes its files with
    another's."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a folder; give a folder (new or empty) as --out")
    if path.exists() and holds_files(path):
        raise ConfigError(f"output folder {path} already holds files; {hint}")


_INTEGER_FIELDS = frozenset(
    {"interval", "seed", "synthetic_steps", "synthetic_layers", "synthetic_experts", "replicas",
     "groups", "nodes", "gpus", "memory_mb"}
)


def _parse(name: str, text: str, variable: str) -> Any:
    """An environment variable's text as the setting's type (the dataclass checks the rest)."""
    try:
        if name in _INTEGER_FIELDS:
            return int(text)
        if name in ("timeout_s", "budget_s"):
            return float(text)
    except ValueError:
        kind = "an integer" if name in _INTEGER_FIELDS else "a number"
        raise ConfigError(f"{variable}={text!r} is not {kind}") from None
    return text


@lru_cache(maxsize=4)
def _windows(settings: EvaluationSettings) -> tuple[np.ndarray, tuple[int, ...]]:
    """The windows [W, L, E] (read-only) and the forward steps in each."""
    from tape.protocol import check_windows
    from tape.trace import load_trace, window_loads

    if settings.windows_file is not None:
        try:
            with np.load(settings.windows_file, allow_pickle=False) as saved:
                windows, steps = saved["windows"], tuple(int(n) for n in saved["steps"])
        except (OSError, ValueError, KeyError) as error:
            raise TraceError(f"cannot read windows file {settings.windows_file}: {error}") from None
        if len(steps) != len(windows):
            raise TraceError(
                f"windows file {settings.windows_file} has {len(windows)} windows but "
                f"{len(steps)} step counts"
            )
    else:
        if settings.trace is not None:
            loads = load_trace(settings.trace)
        else:
            from tape.synthetic import synthetic_trace, trace_model

            loads = synthetic_trace(
                num_steps=settings.synthetic_steps, num_layers=settings.synthetic_layers,
                num_experts=settings.synthetic_experts, num_groups=settings.groups,
                seed=settings.seed, model=trace_model(settings.synthetic_model),
            )
        windows = window_loads(loads, settings.interval)
        total = loads.shape[0]
        steps = tuple(min(settings.interval, total - start)
                      for start in range(0, total, settings.interval))
    windows = check_windows(windows, settings.layout())
    windows.setflags(write=False)
    return windows, steps
