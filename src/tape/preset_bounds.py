"""The physically sensible range of each model and cluster preset field.

A preset or a config file's override outside its range is an error (`tape.presets` checks every
field here after checking that it is a finite positive number): values such as
`bytes_per_parameter: 1e308` or `ib_bandwidth: 1e-300` would otherwise give infinite or NaN
costs and scores. The ranges are wide (from far below today's hardware to far above it) and
documented in docs/cost-model.md. A field not listed here is only checked to be positive.
"""

from __future__ import annotations

from tape.errors import ConfigError

__all__ = ["FIELD_BOUNDS", "check_bounds"]

FIELD_BOUNDS: dict[str, tuple[float, float, str]] = {
    # model
    "num_layers": (1, 1024, ""),
    "num_experts": (1, 65536, ""),
    "num_groups": (1, 65536, ""),
    "top_k": (1, 1024, ""),
    "topk_groups": (1, 1024, ""),
    "hidden_size": (1, 2**20, ""),
    "moe_intermediate_size": (1, 2**20, ""),
    "bytes_per_parameter": (0.125, 8, " bytes"),  # 1-bit to float64
    "dispatch_bytes_per_token": (1, 2**26, " bytes"),
    "combine_bytes_per_token": (1, 2**26, " bytes"),
    # cluster, per GPU
    "gpus_per_node": (1, 1024, ""),
    "nvlink_bandwidth": (1e6, 1e14, " B/s"),  # 1 MB/s to 100 TB/s
    "ib_bandwidth": (1e6, 1e14, " B/s"),
    "flops": (1e9, 1e18, " FLOP/s"),
    "memory_bandwidth": (1e9, 1e15, " B/s"),
}
"""Field -> (lowest, highest, unit)."""


def check_bounds(key: str, value: float, where: str) -> None:
    """ConfigError unless `value` of preset field `key` lies in its FIELD_BOUNDS range."""
    if key not in FIELD_BOUNDS:
        return
    low, high, unit = FIELD_BOUNDS[key]
    if not low <= value <= high:
        raise ConfigError(f"{where}: {key} must be between {low:g} and {high:g}{unit}, got "
                          f"{value!r}")
