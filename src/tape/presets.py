"""Model and cluster presets, typed, read from `data/presets.yaml` or a user's config file.

A config file is YAML (or JSON) with optional `model:` and `cluster:` sections; each names a
preset to start from (`preset: h800`) and overrides any of its fields. Unknown keys, missing files
and wrong types are errors, never silent defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tape.errors import ConfigError
from tape.preset_bounds import check_bounds

__all__ = [
    "ClusterSpec",
    "ModelSpec",
    "cluster_preset",
    "cluster_presets",
    "load_config",
    "model_preset",
    "model_presets",
    "read_mapping_file",
    "syntax_error_line",
]


@dataclass(frozen=True)
class ModelSpec:
    """An MoE model's shape and sizes.

    Attributes:
        name: preset name.
        num_layers: L, MoE layers.
        num_experts: E, routed experts per layer.
        num_groups: expert groups of consecutive ids, None where routing is not group-limited.
        top_k: experts each token is routed to.
        topk_groups: groups a token's experts may come from (None with `num_groups`).
        hidden_size: model width (values per token).
        moe_intermediate_size: an expert's inner width.
        bytes_per_parameter: bytes per expert weight (1 for FP8).
        dispatch_bytes_per_token: bytes sent per token to an expert (FP8 values + scales).
        combine_bytes_per_token: bytes sent back per token from an expert (BF16).
    """

    name: str
    num_layers: int
    num_experts: int
    num_groups: int | None
    top_k: int
    topk_groups: int | None
    hidden_size: int
    moe_intermediate_size: int
    bytes_per_parameter: float
    dispatch_bytes_per_token: float
    combine_bytes_per_token: float

    @property
    def layout_groups(self) -> int:
        """The layout's `num_groups` for this model: its groups, or 1 (one group of all experts)
        where routing is not group-limited."""
        return self.num_groups or 1

    @property
    def bytes_per_expert(self) -> float:
        """Bytes of one expert's weights: 3 matrices of hidden x moe_intermediate."""
        return 3 * self.hidden_size * self.moe_intermediate_size * self.bytes_per_parameter

    @property
    def flops_per_token(self) -> float:
        """FLOPs one expert spends on one token: 3 matrix products, 2 FLOPs per weight."""
        return 2 * 3 * self.hidden_size * self.moe_intermediate_size


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster's per-GPU bandwidths and compute.

    Attributes:
        name: preset name.
        gpus_per_node: GPUs that share NVLink in this hardware (the node size its bandwidths
            were measured on); the cost model takes the node size from the `Layout`.
        nvlink_bandwidth: bytes/s each GPU sends (and, at once, receives) over NVLink.
        ib_bandwidth: bytes/s each GPU sends (and, at once, receives) over InfiniBand.
        flops: FLOP/s a GPU achieves in the experts' grouped GEMM.
        memory_bandwidth: bytes/s a GPU reads from its HBM; each active expert's weights are
            read once per layer.
    """

    name: str
    gpus_per_node: int
    nvlink_bandwidth: float
    ib_bandwidth: float
    flops: float
    memory_bandwidth: float


_OPTIONAL = {"num_groups", "topk_groups"}
"""Fields that may be null: a model whose routing is not group-limited has neither."""


@lru_cache(maxsize=1)
def _builtin() -> dict[str, dict[str, dict[str, Any]]]:
    text = resources.files("tape").joinpath("data/presets.yaml").read_text()
    return yaml.safe_load(text)


def _build(kind: type, name: str, fields: dict[str, Any], where: str) -> Any:
    known = {field.name: field for field in dataclasses.fields(kind) if field.name != "name"}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    missing = sorted(set(known) - set(fields))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    values: dict[str, Any] = {"name": name}
    for key, value in fields.items():
        expected = known[key].type
        if value is None and key in _OPTIONAL:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and "e" in value.lower():
                hint = " (YAML reads an exponent as a number only with a dot and a sign: 50.0e+9)"
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}{hint}")
        if not math.isfinite(value):  # YAML's .nan and .inf
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        if value <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {value!r}")
        check_bounds(key, value, where)
        if expected.startswith("int"):
            if value != int(value):
                raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
            value = int(value)
        values[key] = float(value) if expected == "float" else value
    if kind is ModelSpec:
        _check_model_shape(values, where)
    return kind(**values)


def _check_model_shape(values: dict[str, Any], where: str) -> None:
    """ConfigError unless the model's routing fits its experts: groups dividing the experts,
    both group fields given or both null, topk_groups <= num_groups, top_k within reach."""
    experts, groups, chosen = values["num_experts"], values["num_groups"], values["topk_groups"]
    if (groups is None) != (chosen is None):
        raise ConfigError(f"{where}: num_groups and topk_groups are both numbers (group-limited "
                          f"routing) or both null (none), got {groups} and {chosen}")
    if groups is not None:
        if experts % groups:
            raise ConfigError(f"{where}: num_groups ({groups}) must divide num_experts "
                              f"({experts})")
        if chosen > groups:
            raise ConfigError(f"{where}: topk_groups ({chosen}) must be at most num_groups "
                              f"({groups})")
    reach = experts if groups is None else chosen * (experts // groups)
    if values["top_k"] > reach:
        raise ConfigError(f"{where}: top_k ({values['top_k']}) must be at most the {reach} "
                          "experts a token can reach")


def _preset(section: str, kind: type, name: str) -> Any:
    presets = _builtin()[section]
    if name not in presets:
        raise ConfigError(
            f"unknown {section[:-1]} preset {name!r}; known: {', '.join(sorted(presets))}"
        )
    return _build(kind, name, dict(presets[name]), f"preset {name!r}")


def model_preset(name: str = "deepseek-v3") -> ModelSpec:
    """The built-in model preset `name`."""
    return _preset("models", ModelSpec, name)


def cluster_preset(name: str = "h800") -> ClusterSpec:
    """The built-in cluster preset `name`."""
    return _preset("clusters", ClusterSpec, name)


def model_presets() -> tuple[str, ...]:
    """Names of the built-in model presets, in the data file's order."""
    return tuple(_builtin()["models"])


def cluster_presets() -> tuple[str, ...]:
    """Names of the built-in cluster presets, in the data file's order."""
    return tuple(_builtin()["clusters"])


def _override(base: Any, overrides: dict[str, Any], where: str) -> Any:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "name"}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    fields.update(overrides)
    return _build(type(base), base.name, fields, where)


def read_mapping_file(path: Path, what: str, expected: str = "a mapping") -> dict[str, Any]:
    """The mapping a YAML file (JSON for a `.json` suffix) holds; empty for an empty file.

    Raises ConfigError, naming the file as `what` (e.g. "config file"), when the path is a
    folder or missing, the text is not UTF-8 or not valid YAML/JSON (one line: where and what,
    `syntax_error_line`), or it does not hold `expected`, a mapping.
    """
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a YAML/JSON file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{what} {path} is not valid {kind}: {syntax_error_line(error)}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold {expected}")
    return data


def syntax_error_line(error: Exception) -> str:
    """A YAML or JSON syntax error in one line: where it is (line, column) and what is wrong.

    PyYAML's own message spans several lines (the text, a caret, a mark per clause).
    """
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    if not isinstance(error, yaml.MarkedYAMLError):
        return str(error).splitlines()[0]
    mark, problem = error.problem_mark, error.problem
    if problem is None:
        mark, problem = error.context_mark, error.context
    text = " ".join(str(problem).split())
    if mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    if error.problem is not None and error.context is not None:
        context = " ".join(error.context.split())
        if error.context_mark is not None:
            context += (f" that starts at line {error.context_mark.line + 1}, column "
                        f"{error.context_mark.column + 1}")
        text += f" ({context})"
    return text


def load_config(
    path: str | Path | None = None,
    *,
    model: str | None = None,
    cluster: str | None = None,
) -> tuple[ModelSpec, ClusterSpec]:
    """The model and cluster to use: presets, then the config file's overrides.

    `model` / `cluster` (flags) choose the presets and win over a `preset:` in the file.
    """
    sections: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        sections = read_mapping_file(path, "config file", "a mapping with model:/cluster:")
        unknown = sorted(set(sections) - {"model", "cluster"})
        if unknown:
            raise ConfigError(
                f"config file {path}: unknown section(s) {', '.join(unknown)}; "
                "known: model, cluster"
            )
    specs = []
    for section, choice, default, build in (
        ("model", model, "deepseek-v3", model_preset),
        ("cluster", cluster, "h800", cluster_preset),
    ):
        where = (f"config file {path}, section {section}" if path is not None
                 else f"{section} preset")
        overrides = sections.get(section) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(
                f"{where}: must be a mapping of preset fields, got a {type(overrides).__name__}"
            )
        overrides = dict(overrides)
        preset_name = choice or overrides.pop("preset", None) or default
        overrides.pop("preset", None)
        specs.append(_override(build(preset_name), overrides, where))
    return specs[0], specs[1]
