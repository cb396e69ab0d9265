"""The expert-parallel layout: slots, GPUs, nodes and expert groups.

Slot `s` lives on GPU `s // slots_per_gpu`; GPU `g` lives on node `g // gpus_per_node`.
All of TAPE uses this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tape.errors import LayoutError, checked_integer

__all__ = ["Layout"]


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
                f"num_gpus ({self.num_gpus}) must be a multiple of num_nodes ({self.num_nodes})"
            )
        if self.num_replicas % self.num_gpus:
            raise LayoutError(
                f"num_replicas ({self.num_replicas}) must be a multiple of num_gpus "
                f"({self.num_gpus})"
            )

    def check_experts(self, num_experts: int) -> None:
        """Raise `LayoutError` unless `num_experts` experts fit this layout."""
        if num_experts < 1:
            raise LayoutError(f"need at least one expert, got {num_experts}")
        if self.num_replicas < num_experts:
            raise LayoutError(
                f"num_replicas ({self.num_replicas}) must be at least the number of experts "
                f"({num_experts}): every expert needs a slot"
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

