"""The expert-parallel layout: slots, GPUs, nodes and expert groups.

Slot `s` lives on GPU `s // slots_per_gpu`; GPU `g` lives on node `g // gpus_per_node`.
All of TAPE uses this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from tape.errors import LayoutError, checked_integer

if TYPE_CHECKING:
    from tape.presets import ModelSpec

__all__ = ["Layout", "default_replicas"]


def default_replicas(num_experts: int, num_gpus: int) -> int:
    """The default S: one more slot per GPU than the experts need, G * (ceil(E / G) + 1)
    (288 for DeepSeek-V3's 256 experts on 32 GPUs)."""
    num_experts = checked_integer(num_experts, "num_experts", LayoutError)
    num_gpus = checked_integer(num_gpus, "num_gpus", LayoutError)
    return num_gpus * (-(-num_experts // num_gpus) + 1)


@dataclass(frozen=True)
class Layout:
    """Arguments of `rebalance_experts` that describe the cluster.

    Attributes:
        num_replicas: S, physical expert slots per layer; a multiple of `num_gpus`.
        num_groups: expert groups (experts come in equal groups of consecutive ids).
        num_nodes: N, server nodes; `num_gpus` is a multiple of it.
        num_gpus: G, GPUs in the expert-parallel group.
    """

    num_replicas: int = 288
    num_groups: int = 8
    num_nodes: int = 4
    num_gpus: int = 32

    def __post_init__(self) -> None:
        for name in ("num_replicas", "num_groups", "num_nodes", "num_gpus"):
            checked_integer(getattr(self, name), name, LayoutError)
        if self.num_gpus % self.num_nodes:
            raise LayoutError(
                f"num_gpus ({self.num_gpus}) must be a multiple of num_nodes ({self.num_nodes}): "
                "every node holds the same number of GPUs"
            )
        if self.num_replicas % self.num_gpus:
            lower = self.num_replicas // self.num_gpus * self.num_gpus
            nearest = f"{lower} or {lower + self.num_gpus}" if lower else str(self.num_gpus)
            raise LayoutError(
                f"num_replicas ({self.num_replicas}) must be a multiple of num_gpus "
                f"({self.num_gpus}): every GPU holds the same number of slots (nearest: "
                f"{nearest})"
            )

    @classmethod
    def for_model(cls, model: ModelSpec, num_gpus: int, num_nodes: int = 1,
                  num_replicas: int | None = None) -> Layout:
        """The layout of `model` (its expert groups, 1 without group-limited routing) on
        `num_gpus` GPUs in `num_nodes` nodes, with `default_replicas` slots unless given."""
        if num_replicas is None:
            num_replicas = default_replicas(model.num_experts, num_gpus)
        layout = cls(num_replicas, model.layout_groups, num_nodes, num_gpus)
        layout.check_experts(model.num_experts)
        return layout

    def check_experts(self, num_experts: int) -> None:
        """Raise `LayoutError` unless `num_experts` experts fit this layout."""
        if num_experts < 1:
            raise LayoutError(f"need at least one expert, got {num_experts}")
        if self.num_replicas < num_experts:
            least = -(-num_experts // self.num_gpus) * self.num_gpus
            raise LayoutError(
                f"num_replicas ({self.num_replicas}) must be at least the number of experts "
                f"({num_experts}): every expert needs a slot (the least that fits "
                f"{self.num_gpus} GPUs: {least}; the default: "
                f"{default_replicas(num_experts, self.num_gpus)})"
            )
        if num_experts % self.num_groups:
            raise LayoutError(
                f"num_groups ({self.num_groups}) must divide the number of experts ({num_experts})"
            )

    @property
    def slots_per_gpu(self) -> int:
        """k = S / G."""
        return self.num_replicas // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        """G / N."""
        return self.num_gpus // self.num_nodes

    @cached_property
    def slot_gpu(self) -> np.ndarray:
        """[S] int64: the GPU of each slot."""
        return np.arange(self.num_replicas, dtype=np.int64) // self.slots_per_gpu

    @cached_property
    def gpu_node(self) -> np.ndarray:
        """[G] int64: the node of each GPU."""
        return np.arange(self.num_gpus, dtype=np.int64) // self.gpus_per_node

    @cached_property
    def slot_node(self) -> np.ndarray:
        """[S] int64: the node of each slot."""
        return self.gpu_node[self.slot_gpu]

