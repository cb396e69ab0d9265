"""Local search for the `tape` policy: swaps between heavy and light GPUs, all layers at once.

Each round sorts every layer's GPUs by forecast load and pairs the heaviest with the lightest,
the second heaviest with the second lightest, and so on for `pairs` pairs. For each pair it
tries every swap of one slot of the heavy GPU with one slot of the light GPU and keeps the swap
that lowers the objective most (tape_state module doc), counting for that swap:

- balance: the change of the pair's larger load (it must fall below the heavy GPU's load);
- migration: the change in weight copies (a slot whose GPU did not hold its expert before);
- locality: the change in inter-node tokens when the swap moves experts between nodes.

A swap that would put two replicas of an expert on one GPU is never made. The pairs of a round
share no GPU, so their swaps are independent and are all applied. A layer stops when no pair
finds a swap that lowers the objective, or when its heaviest GPU is within `tolerance` of the
mean; the search stops after `rounds` rounds.
"""

from __future__ import annotations

import numpy as np

from tape.policies.tape_state import SlotState

__all__ = ["balance_by_swaps"]


def balance_by_swaps(
    state: SlotState,
    *,
    rounds: int,
    pairs: int,
    migration_weight: float,
    locality_weight: float,
    tolerance: float,
) -> None:
    """Improve `state` in place by rounds of swaps (module doc).

    Args:
        state: the placement to improve; every GPU holds at most one replica of an expert.
        rounds: the most rounds.
        pairs: heavy/light GPU pairs per round, at most G / 2.
        migration_weight: charge per weight copy, in units of the layer's mean GPU load.
        locality_weight: charge per inter-node token, relative to the layer's total load.
        tolerance: a layer whose heaviest GPU is at most (1 + tolerance) * mean is left alone.
    """
    layout = state.layout
    _, num_gpus, per_gpu = state.experts.shape
    num_experts = state.load.shape[1]
    num_nodes = layout.num_nodes
    mean = state.mean_gpu_load
    node_charge = locality_weight / state.total_load / num_nodes  # per token of expert load
    held = state.held.reshape(-1)
    held_before = None
    if state.held_before is not None and migration_weight:
        held_before = state.held_before.reshape(-1)
    node_replicas = state.node_replicas.reshape(-1)
    active = state.gpu_load.max(axis=1) > (1.0 + tolerance) * mean
    for _ in range(rounds):
        layers = np.flatnonzero(active)
        if not len(layers):
            break
        count = len(layers)
        load = state.gpu_load[layers]
        by_load = np.argsort(load, axis=1)
        heavy, light = by_load[:, : -pairs - 1 : -1], by_load[:, :pairs]  # [n, p]
        rows = np.arange(count)[:, None]
        heavy_load, light_load = load[rows, heavy], load[rows, light]
        layer_column = layers[:, None]
        give = state.experts[layer_column, heavy]  # [n, p, k] experts leaving the heavy GPU
        take = state.experts[layer_column, light]  # [n, p, k] experts leaving the light GPU
        give_load = state.slot_load[layer_column, heavy]
        take_load = state.slot_load[layer_column, light]
        shift = give_load[..., :, None] - take_load[..., None, :]  # [n, p, k, k]
        # Balance: the change of the pair's larger load, per mean GPU load; only a fall counts.
        score = np.maximum(heavy_load[..., None, None] - shift, light_load[..., None, None] + shift)
        score -= heavy_load[..., None, None]
        score /= mean[layers, None, None, None]
        score[score >= 0.0] = np.inf
        # Per-slot terms [n, p, k], added once: inf where the expert is on the other GPU.
        heavy_base = ((layer_column * num_gpus + heavy) * num_experts)[..., None]  # [n, p, 1]
        light_base = ((layer_column * num_gpus + light) * num_experts)[..., None]
        give_cost = np.where(held[light_base + give], np.inf, 0.0)
        take_cost = np.where(held[heavy_base + take], np.inf, 0.0)
        if held_before is not None:
            give_cost += migration_weight * (held_before[heavy_base + give].astype(np.int8)
                                             - held_before[light_base + give])
            take_cost += migration_weight * (held_before[light_base + take].astype(np.int8)
                                             - held_before[heavy_base + take])
        if locality_weight and num_nodes > 1:
            heavy_node = layout.gpu_node[heavy]
            light_node = layout.gpu_node[light]
            heavy_node_base = ((layer_column * num_nodes + heavy_node) * num_experts)[..., None]
            light_node_base = ((layer_column * num_nodes + light_node) * num_experts)[..., None]
            # Nodes the swap adds (+1) or removes (-1) for each expert: zero within a node.
            give_nodes = ((node_replicas[light_node_base + give] == 0).astype(np.int8)
                          - (node_replicas[heavy_node_base + give] == 1))
            take_nodes = ((node_replicas[heavy_node_base + take] == 0).astype(np.int8)
                          - (node_replicas[light_node_base + take] == 1))
            charge = node_charge[layers, None, None] * (heavy_node != light_node)[..., None]
            give_cost -= charge * state.load[layer_column[..., None], give] * give_nodes
            take_cost -= charge * state.load[layer_column[..., None], take] * take_nodes
        score += give_cost[..., :, None]
        score += take_cost[..., None, :]
        score = score.reshape(count, pairs, per_gpu * per_gpu)
        best = score.argmin(axis=2)
        gain = -np.take_along_axis(score, best[..., None], axis=2)[..., 0]
        useful = (gain > 1e-12) & (heavy_load > (1.0 + tolerance) * mean[layers, None])
        active[layers[~useful.any(axis=1)]] = False
        pair_layer, pair = np.nonzero(useful)
        if not len(pair_layer):
            break
        give_slot, take_slot = np.divmod(best[pair_layer, pair], per_gpu)
        state.swap(layers[pair_layer], heavy[pair_layer, pair], give_slot,
                   light[pair_layer, pair], take_slot)
