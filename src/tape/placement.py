"""The `Placement` type: which logical expert each physical slot holds, for every layer.

Glossary (see the package docstring): `phy2log[L, S]` is the expert of each slot,
`logcnt[L, E]` the replica count of each expert, `log2phy[L, E, X]` the slots of each expert
padded with -1 (X = the largest replica count). The first slot of an expert in `log2phy` is its
primary replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from tape.arrays import to_numpy
from tape.errors import PlacementError, counted
from tape.layout import Layout

__all__ = ["PlacedWindow", "Placement"]


def _integer_array(value: Any, name: str, ndim: int) -> np.ndarray:
    array = to_numpy(value)
    if array.ndim != ndim:
        raise PlacementError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise PlacementError(f"{name} holds NaN or infinite values")
        if np.any(array != np.round(array)):
            raise PlacementError(f"{name} holds non-integer values")
    elif array.dtype.kind not in "iub":
        raise PlacementError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


class Placement:
    """A validated placement of E experts on S slots, for L layers.

    Build it with `Placement(phy2log, num_experts)` (log2phy in slot order) or
    `Placement.from_maps(phy2log, log2phy, logcnt)` to keep a policy's own replica order.
    """

    __slots__ = ("log2phy", "logcnt", "phy2log")

    def __init__(self, phy2log: Any, num_experts: int, log2phy: Any | None = None) -> None:
        phy2log = _integer_array(phy2log, "phy2log", 2)
        num_layers, num_slots = phy2log.shape
        if num_layers < 1 or num_slots < 1:
            raise PlacementError(f"phy2log is empty (shape {phy2log.shape})")
        if num_experts < 1:
            raise PlacementError(f"num_experts must be positive, got {num_experts}")
        low, high = int(phy2log.min()), int(phy2log.max())
        if low < 0 or high >= num_experts:
            raise PlacementError(
                f"phy2log holds expert ids in [{low}, {high}], expected [0, {num_experts - 1}]"
            )
        offsets = np.arange(num_layers, dtype=np.int64)[:, None] * num_experts
        logcnt = np.bincount((phy2log + offsets).ravel(), minlength=num_layers * num_experts)
        logcnt = logcnt.reshape(num_layers, num_experts)
        if not logcnt.all():
            missing = np.argwhere(logcnt == 0)
            layer, expert = missing[0]
            raise PlacementError(
                f"expert {expert} of layer {layer} has no replica "
                f"({len(missing)} experts without a replica in all)"
            )
        self.phy2log = phy2log
        self.logcnt = logcnt
        self.log2phy = self._slot_order_log2phy() if log2phy is None else self._check_log2phy(log2phy)

    @classmethod
    def from_maps(cls, phy2log: Any, log2phy: Any, logcnt: Any) -> Placement:
        """A placement from a policy's three outputs, rejecting any disagreement between them."""
        logcnt_array = _integer_array(logcnt, "logcnt", 2)
        placement = cls(phy2log, logcnt_array.shape[1], log2phy=log2phy)
        if logcnt_array.shape != placement.logcnt.shape:
            raise PlacementError(
                f"logcnt has shape {logcnt_array.shape}, expected {placement.logcnt.shape}"
            )
        wrong = np.argwhere(logcnt_array != placement.logcnt)
        if len(wrong):
            layer, expert = wrong[0]
            raise PlacementError(
                f"logcnt[{layer}, {expert}] = {logcnt_array[layer, expert]} but phy2log holds "
                f"{placement.logcnt[layer, expert]} replicas of expert {expert} in layer {layer}"
            )
        return placement

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    def _slot_order_log2phy(self) -> np.ndarray:
        num_layers, num_slots = self.phy2log.shape
        width = int(self.logcnt.max())
        # A stable sort of 16-bit keys is a radix sort, much faster than one of int64 ids.
        keys = self.phy2log.astype(np.int16) if self.num_experts <= 2**15 else self.phy2log
        order = np.argsort(keys, axis=1, kind="stable")
        sorted_experts = np.take_along_axis(self.phy2log, order, axis=1)
        starts = np.cumsum(self.logcnt, axis=1) - self.logcnt
        rank = np.arange(num_slots)[None, :] - np.take_along_axis(starts, sorted_experts, axis=1)
        log2phy = np.full(num_layers * self.num_experts * width, -1, dtype=np.int64)
        layer_offsets = np.arange(num_layers, dtype=np.int64)[:, None] * self.num_experts
        log2phy[((layer_offsets + sorted_experts) * width + rank).ravel()] = order.ravel()
        return log2phy.reshape(num_layers, self.num_experts, width)

    def _check_log2phy(self, log2phy: Any) -> np.ndarray:
        log2phy = _integer_array(log2phy, "log2phy", 3)
        num_layers, num_slots = self.phy2log.shape
        if log2phy.shape[:2] != (num_layers, self.num_experts) or log2phy.shape[2] < 1:
            raise PlacementError(
                f"log2phy has shape {log2phy.shape}, expected ({num_layers}, "
                f"{self.num_experts}, X) with X >= {int(self.logcnt.max())}"
            )
        if log2phy.min() < -1 or log2phy.max() >= num_slots:
            raise PlacementError(f"log2phy holds slot ids outside [-1, {num_slots - 1}]")
        width = log2phy.shape[2]
        flat = log2phy.reshape(-1)
        valid = flat >= 0
        # Entry r of expert e is a slot exactly when r < logcnt[e] (slots before padding).
        expected = np.tile(np.arange(width), num_layers * self.num_experts)
        expected = expected < np.repeat(self.logcnt.reshape(-1), width)
        if not np.array_equal(valid, expected):
            counts = (log2phy >= 0).sum(axis=2)
            if np.any(counts != self.logcnt):
                layer, expert = np.argwhere(counts != self.logcnt)[0]
                raise PlacementError(
                    f"log2phy lists {counts[layer, expert]} slots for expert {expert} of layer "
                    f"{layer} but phy2log holds {self.logcnt[layer, expert]}"
                )
            raise PlacementError("log2phy must list each expert's slots before its -1 padding")
        # The L * S listed slots, by layer, expert and rank, as indices into phy2log's flat view.
        listed = flat[valid] + np.repeat(np.arange(num_layers) * num_slots, num_slots)
        experts = np.repeat(np.tile(np.arange(self.num_experts), num_layers),
                            self.logcnt.reshape(-1))
        holds = self.phy2log.reshape(-1).take(listed)
        if not np.array_equal(holds, experts):
            index = int(np.argmax(holds != experts))
            layer, slot = divmod(int(listed[index]), num_slots)
            raise PlacementError(
                f"log2phy puts expert {experts[index]} of layer {layer} in slot {slot}, which "
                f"phy2log gives to expert {holds[index]}"
            )
        seen = np.zeros(num_layers * num_slots, dtype=bool)
        seen[listed] = True  # L * S entries: all slots covered means each is listed once
        if not seen.all():
            index = int(np.argmin(seen))
            times = np.bincount(listed, minlength=num_layers * num_slots)
            twice = int(np.argmax(times > 1))
            raise PlacementError(
                f"log2phy lists slot {twice % num_slots} of layer {twice // num_slots} "
                f"{times[twice]} times and slot {index % num_slots} of layer "
                f"{index // num_slots} never; each slot must be listed exactly once"
            )
        return log2phy

    def validate(self, layout: Layout, num_layers: int | None = None) -> Placement:
        """Check that this placement fits `layout` (and `num_layers`, if given); return it."""
        if self.num_slots != layout.num_replicas:
            raise PlacementError(
                f"phy2log has {self.num_slots} slots per layer, expected num_replicas = "
                f"{layout.num_replicas}"
            )
        if num_layers is not None and self.num_layers != num_layers:
            raise PlacementError(f"phy2log has {counted(self.num_layers, 'layer')}, expected {num_layers}")
        return self

    def primary_slots(self) -> np.ndarray:
        """[L, E] int64: the primary slot of each expert (its first slot in `log2phy`)."""
        return self.log2phy[:, :, 0]

    def slot_loads(self, weight: np.ndarray) -> np.ndarray:
        """[L, S] float64: each slot's load, `weight[l, e] / logcnt[l, e]` for its expert e."""
        per_replica = np.asarray(weight, dtype=np.float64) / self.logcnt
        return np.take_along_axis(per_replica, self.phy2log, axis=1)

    def gpu_loads(self, weight: np.ndarray, num_gpus: int) -> np.ndarray:
        """[L, G] float64: each GPU's load, the sum of its slots' loads."""
        slots = self.slot_loads(weight)
        return slots.reshape(self.num_layers, num_gpus, -1).sum(axis=2)

    def replicas_per_gpu(self, num_gpus: int) -> np.ndarray:
        """[L, G, E] int64: how many replicas of each expert each GPU holds."""
        slots_per_gpu = self.num_slots // num_gpus
        counts = np.zeros((self.num_layers, num_gpus, self.num_experts), dtype=np.int64)
        gpus = np.arange(self.num_slots) // slots_per_gpu
        np.add.at(counts, (np.arange(self.num_layers)[:, None], gpus[None, :], self.phy2log), 1)
        return counts

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(phy2log, log2phy, logcnt)`, the outputs of `rebalance_experts`."""
        return self.phy2log, self.log2phy, self.logcnt

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and np.array_equal(self.phy2log, other.phy2log)

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, experts={self.num_experts}, "
            f"slots={self.num_slots}, max_replicas={int(self.logcnt.max())})"
        )


@dataclass(frozen=True, eq=False)
class PlacedWindow:
    """One placement on one window's load: what every metric reads, checked once.

    `PlacedWindow.checked(placement, weight, layout)` is the door: it validates the placement
    against the layout and the load by `tape.trace.check_load`'s rules (float64, finite, >= 0,
    at most 2**53, shaped like the placement). The protocol, which has checked both where they
    entered, builds it directly; the metrics (`tape.metrics`, `tape.dispatch`,
    `tape.costmodel`) trust it and share its loads, computed once.

    Attributes:
        placement: the placement, fitting `layout`.
        weight: [L, E] float64, tokens routed to each logical expert in the window.
        layout: the cluster.
    """

    placement: Placement
    weight: np.ndarray
    layout: Layout

    @classmethod
    def checked(cls, placement: Placement, weight: Any, layout: Layout) -> PlacedWindow:
        """A `PlacedWindow` of arguments from outside; PlacementError or TraceError naming
        what does not fit."""
        from tape.trace import check_load

        placement.validate(layout)
        weight = check_load(
            weight, num_layers=placement.num_layers, num_experts=placement.num_experts
        )
        return cls(placement, weight, layout)

    @cached_property
    def slot_loads(self) -> np.ndarray:
        """[L, S] float64: each slot's load, `weight[l, e] / logcnt[l, e]`."""
        return self.placement.slot_loads(self.weight)

    @cached_property
    def slot_loads_by_gpu(self) -> np.ndarray:
        """[L, G, k] float64: `slot_loads` with the slots of each GPU together."""
        return self.slot_loads.reshape(
            self.placement.num_layers, self.layout.num_gpus, self.layout.slots_per_gpu
        )

    @cached_property
    def gpu_loads(self) -> np.ndarray:
        """[L, G] float64: each GPU's load, the sum of its slots' loads."""
        return self.slot_loads_by_gpu.sum(axis=2)

    @cached_property
    def replicas_per_gpu(self) -> np.ndarray:
        """[L, G, E] float64: replicas of each expert on each GPU."""
        return self.placement.replicas_per_gpu(self.layout.num_gpus).astype(np.float64)
