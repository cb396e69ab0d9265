"""`min-moves`: another policy's placement, rearranged so that fewer experts move.

The seed's `minimize_moves` swapped experts of similar load back to the GPU they came from.
Here, given the placement in force (`previous`; without one, the vanilla placement, as the seed
compared with), the base policy's placement is rearranged in three steps that keep every
invariant (slots per GPU, replica counts, so every slot load, and no new duplicate on a GPU):

1. Relabel: nodes, then GPUs within nodes, are renamed to match the previous placement as well
   as possible (a linear assignment per layer on the replicas they share). GPU loads are only
   permuted, so balance is unchanged.
2. Swap back: slot by slot, a replica that moved onto its GPU trades places with a replica of an
   expert that GPU held before (of the closest load per replica), when that saves a move and
   leaves both GPUs at or below the layer's limit: the base placement's largest GPU load times
   1 + `tolerance`. With the default tolerance 0 the largest GPU load never grows.
3. Keep slots: within each GPU, an expert that stays keeps the slot it had.

A replica that was on its GPU before is its expert's primary in `log2phy`.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from tape.layout import Layout
from tape.placement import Placement
from tape.policies import PolicyError, call_policy, get_policy, register
from tape.policies.packing import placement_from_ranks, replica_ranks

__all__ = ["min_moves"]


@register("min-moves")
def min_moves(
    weight: np.ndarray,
    layout: Layout,
    *,
    previous: Placement | None = None,
    history: np.ndarray | None = None,
    base: str = "deepseek",
    tolerance: float = 0.0,
) -> Placement:
    """The `base` policy's placement with fewer expert moves from `previous`.

    Args:
        weight: [L, E] float64, each expert's load.
        layout: the cluster.
        previous: the placement in force; None compares with the vanilla placement.
        history: passed on to the base policy.
        base: the registered policy whose placement is rearranged (run with its default
            parameters).
        tolerance: how far (relative) swaps may raise a layer's largest GPU load above the
            base placement's; 0 or more.

    Returns:
        Placement; a replica that stayed on its GPU comes first in `log2phy`.
    """
    _check_values({"base": base, "tolerance": tolerance})
    num_layers, num_experts = weight.shape
    placement = call_policy(get_policy(base), weight, layout, previous=previous, history=history)
    if previous is None:
        previous = get_policy("vanilla")(weight, layout)
    elif previous.phy2log.shape != placement.phy2log.shape or previous.num_experts != num_experts:
        raise PolicyError(
            f"the previous placement has {previous.num_layers} layers, {previous.num_slots} "
            f"slots and {previous.num_experts} experts; expected {num_layers}, "
            f"{layout.num_replicas} and {num_experts}"
        )

    shape = (num_layers, layout.num_gpus, layout.slots_per_gpu)
    before = previous.phy2log.reshape(shape)
    held_before = _holdings(before, num_experts) > 0
    experts = _relabel(placement.phy2log.reshape(shape), held_before, layout)
    replica_load = weight / placement.logcnt
    experts = _swap_back(experts, before, held_before, replica_load, 1.0 + tolerance)
    experts = _keep_slots(experts, before)
    phy2log = experts.reshape(num_layers, -1)
    stayed = np.take_along_axis(held_before, experts, axis=2).reshape(num_layers, -1)
    rank = replica_ranks(phy2log, num_experts, (~stayed).astype(np.int64))
    return placement_from_ranks(phy2log, rank, num_experts)


def _holdings(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, G, E] int64: replicas of each expert on each GPU, from `experts[L, G, k]`."""
    num_layers, num_gpus, _ = experts.shape
    cell = (np.arange(num_layers * num_gpus).reshape(num_layers, num_gpus, 1) * num_experts
            + experts)
    counts = np.bincount(cell.reshape(-1), minlength=num_layers * num_gpus * num_experts)
    return counts.reshape(num_layers, num_gpus, num_experts)


def _relabel(experts: np.ndarray, held_before: np.ndarray, layout: Layout) -> np.ndarray:
    """Step 1: permute nodes, then GPUs within nodes, to share the most replicas with before.

    Args:
        experts: [L, G, k] int64, the expert of each slot, by GPU.
        held_before: [L, G, E] bool, whether each GPU held each expert before.
        layout: the cluster.

    Returns:
        [L, G, k] int64, the same GPUs' contents under their new names.
    """
    num_layers, num_gpus, per_gpu = experts.shape
    num_nodes, gpus_per_node = layout.num_nodes, layout.gpus_per_node
    layer = np.arange(num_layers)[:, None, None]
    # shared[l, b, a]: replicas on new GPU a whose expert old GPU b held.
    shared = held_before[layer, :, experts.reshape(num_layers, 1, -1)]  # [L, 1, G*k, G]
    shared = shared.reshape(num_layers, num_gpus, per_gpu, num_gpus).sum(axis=2).transpose(0, 2, 1)
    node_shared = shared.reshape(num_layers, num_nodes, gpus_per_node, num_nodes, gpus_per_node)
    node_shared = node_shared.sum(axis=(2, 4))
    new_name = np.empty((num_layers, num_gpus), dtype=np.int64)
    for index in range(num_layers):
        old_nodes, new_nodes = linear_sum_assignment(node_shared[index], maximize=True)
        for old_node, new_node in zip(old_nodes, new_nodes):
            old_gpus = old_node * gpus_per_node + np.arange(gpus_per_node)
            new_gpus = new_node * gpus_per_node + np.arange(gpus_per_node)
            rows, columns = linear_sum_assignment(
                shared[index][np.ix_(old_gpus, new_gpus)], maximize=True
            )
            new_name[index, new_gpus[columns]] = old_gpus[rows]
    renamed = np.empty_like(experts)
    renamed[np.arange(num_layers)[:, None], new_name] = experts
    return renamed


def _swap_back(
    experts: np.ndarray,
    before: np.ndarray,
    held_before: np.ndarray,
    replica_load: np.ndarray,
    limit_factor: float,
) -> np.ndarray:
    """Step 2: swap moved replicas for replicas of experts their GPU held before.

    Slot by slot (all layers at once), a replica of expert e that GPU g did not hold before is
    swapped with a replica, on another GPU g', of an expert f that g held before, provided g
    does not hold f now, g' does not hold e now, the swap saves a move, and both GPUs stay at or
    below the layer's limit. Among such replicas, the one of closest load per replica wins.

    Args:
        experts: [L, G, k] int64, updated in place.
        before: [L, G, k] int64, the previous placement by GPU.
        held_before: [L, G, E] bool.
        replica_load: [L, E] float64, the load of one replica of each expert.
        limit_factor: the limit is the starting largest GPU load times this.

    Returns:
        `experts`.
    """
    num_layers, num_gpus, per_gpu = experts.shape
    num_experts = held_before.shape[2]
    flat = experts.reshape(num_layers, -1)
    held = _holdings(experts, num_experts).reshape(-1)  # flat [L, G, E]
    was_held = held_before.reshape(-1)
    load_of = replica_load.reshape(-1)  # flat [L, E]
    gpu_load = np.take_along_axis(replica_load, flat, axis=1).reshape(experts.shape).sum(axis=2)
    limit = (gpu_load.max(axis=1) * limit_factor)[:, None, None]
    load_flat = gpu_load.reshape(-1)  # flat [L, G]
    slots_of = _slots_by_expert(flat, num_experts)  # [L, E, X], -1 padded
    width = slots_of.shape[2]
    slot_rows = slots_of.reshape(-1, width)
    layer = np.arange(num_layers)
    cell_base = (layer * num_gpus * num_experts)[:, None, None]  # flat [L, G, E] of (l, 0, 0)
    expert_base = layer * num_experts
    gpu_base = (layer * num_gpus)[:, None, None]

    for slot in range(num_gpus * per_gpu):
        gpu = slot // per_gpu
        expert = flat[:, slot]
        moved = ~was_held[cell_base[:, 0, 0] + gpu * num_experts + expert]
        if not moved.any():
            continue
        wanted = before[:, gpu, :]  # [L, k]: experts this GPU held before
        other_slot = slot_rows[expert_base[:, None] + wanted]  # [L, k, X]
        other_gpu = other_slot // per_gpu
        at_other = cell_base + other_gpu * num_experts  # flat (l, other GPU, 0)
        load_here = load_of[expert_base + expert][:, None, None]
        load_there = load_of[expert_base[:, None] + wanted][:, :, None]
        valid = (
            moved[:, None, None]
            & (other_slot >= 0)
            & (other_gpu != gpu)
            & (held[cell_base[:, :, 0] + gpu * num_experts + wanted] == 0)[:, :, None]
            & (held[at_other + expert[:, None, None]] == 0)
            & ~(was_held[at_other + wanted[:, :, None]] & ~was_held[at_other + expert[:, None, None]])
            & (gpu_load[:, gpu][:, None, None] - load_here + load_there <= limit)
            & (load_flat[gpu_base + other_gpu] - load_there + load_here <= limit)
        )
        gap = np.where(valid, np.abs(load_here - load_there), np.inf).reshape(num_layers, -1)
        best = gap.argmin(axis=1)
        swapped = np.flatnonzero(np.isfinite(gap[layer, best]))
        if not len(swapped):
            continue
        partner_slot = other_slot.reshape(num_layers, -1)[swapped, best[swapped]]
        partner = flat[swapped, partner_slot]
        partner_gpu = partner_slot // per_gpu
        mine = expert[swapped]
        flat[swapped, slot], flat[swapped, partner_slot] = partner, mine
        here = cell_base[swapped, 0, 0] + gpu * num_experts
        there = cell_base[swapped, 0, 0] + partner_gpu * num_experts
        held[here + mine] -= 1
        held[here + partner] += 1
        held[there + partner] -= 1
        held[there + mine] += 1
        delta = replica_load[swapped, partner] - replica_load[swapped, mine]
        gpu_load[swapped, gpu] += delta
        gpu_load[swapped, partner_gpu] -= delta
        mine_slots, partner_slots = slots_of[swapped, mine], slots_of[swapped, partner]
        slots_of[swapped, mine] = np.where(mine_slots == slot, partner_slot[:, None], mine_slots)
        slots_of[swapped, partner] = np.where(
            partner_slots == partner_slot[:, None], slot, partner_slots
        )
    return experts


def _slots_by_expert(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E, X] int64: the slots of each expert in slot order, padded with -1."""
    return Placement(phy2log, num_experts).log2phy.copy()


def _keep_slots(experts: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Step 3: within each GPU, give an expert that stays the slot it had before.

    Args:
        experts: [L, G, k] int64, each GPU's experts (any order).
        before: [L, G, k] int64, the previous placement by GPU.

    Returns:
        [L, G, k] int64, each GPU's experts reordered.
    """
    per_gpu = experts.shape[2]
    free = np.ones(experts.shape, dtype=bool)  # experts[..., j] not yet given a slot
    source = np.full(experts.shape, -1, dtype=np.int64)  # slot i takes experts[..., source]
    for position in range(per_gpu):
        match = free & (experts == before[..., position : position + 1])
        found = match.any(axis=2)
        pick = match.argmax(axis=2)
        source[..., position] = np.where(found, pick, -1)
        layers, gpus = np.nonzero(found)
        free[layers, gpus, pick[found]] = False
    # The slots left over take the experts left over, both in order (C order groups them by
    # layer and GPU, with as many of each in every group).
    source[np.nonzero(source < 0)] = np.nonzero(free)[2]
    return np.take_along_axis(experts, source, axis=2)


def _check_values(params: dict[str, Any]) -> None:
    """`base` a registered policy other than min-moves, `tolerance` a number >= 0; PolicyError
    otherwise (also `tape.policies.check_params`, without placing)."""
    base = params.get("base", "deepseek")
    if base == "min-moves":
        raise PolicyError("min-moves cannot use itself as its base policy")
    get_policy(base)
    tolerance = params.get("tolerance", 0.0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not (
        tolerance >= 0
    ):
        raise PolicyError(f"min-moves tolerance must be a number >= 0, got {tolerance!r}")


min_moves.check_params = _check_values  # type: ignore[attr-defined]
