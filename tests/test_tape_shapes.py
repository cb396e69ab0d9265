"""The `tape` policy's rules that follow the shape: the node bonus per inter-node token saved,
the first placement by DeepSeek's packing greedy, the copy charge in slot loads, the copy
budget of the swaps."""

import numpy as np
import pytest

import tape.policies.tape  # noqa: F401  (registers "tape")
from tape import Layout
from tape.policies.tape import tape_policy
from tape.policies.tape.counts import replica_counts
from tape.policies.tape.packing import dealt_placement, packed_placement


def plain_counts_with_node_bonus(load, slots, nodes, node_spread):
    """Plain loop: each spare slot to the replica of highest worth, the j-th replica (j >= 2)
    of expert e worth load / (j - 1) + node_spread * load / N while j <= N (N >= 2)."""
    counts = [1] * len(load)

    def worth(expert):
        j = counts[expert] + 1
        bonus = node_spread * load[expert] / nodes if nodes >= 2 and j <= nodes else 0.0
        return (load[expert] / (j - 1) + bonus, -expert)

    for _ in range(slots - len(load)):
        counts[max(range(len(load)), key=worth)] += 1
    return counts


@pytest.mark.parametrize("gpus, nodes", [(8, 2), (16, 8), (32, 16)])
def test_the_node_bonus_is_the_inter_node_tokens_a_replica_saves(gpus, nodes):
    layout = Layout(num_replicas=2 * gpus, num_groups=1, num_nodes=nodes, num_gpus=gpus)
    load = np.random.default_rng(gpus).random((3, gpus)) ** 3 * 1000
    counts = replica_counts(load, layout, node_spread=1.2, keep_margin=0.0, previous_counts=None)
    for layer in range(3):
        assert counts[layer].tolist() == plain_counts_with_node_bonus(
            load[layer].tolist(), layout.num_replicas, nodes, 1.2)


def test_more_nodes_weigh_less_per_replica():
    # With 40 nodes a replica saves 1/40 of its expert's tokens: counts stay near EPLB's. The
    # rule before, 0.3 of the whole load for every replica up to N (node_spread 0.3 * N now),
    # gave the hottest expert far more.
    layout = Layout(num_replicas=80, num_groups=1, num_nodes=40, num_gpus=80)
    load = np.array([np.r_[100.0, np.full(39, 10.0)]])

    def hottest(node_spread):
        return int(replica_counts(load, layout, node_spread=node_spread, keep_margin=0.0,
                                  previous_counts=None)[0, 0])

    assert hottest(0.0) <= hottest(1.2) < hottest(0.3 * 40)


@pytest.mark.parametrize("per_gpu", [2, 4, 9])
def test_the_packed_first_placement_balances_at_least_as_well_as_the_snake(per_gpu):
    layout = Layout(num_replicas=16 * per_gpu, num_groups=1, num_nodes=4, num_gpus=16)
    experts = 16 * per_gpu - 16
    load = np.round(np.exp(np.random.default_rng(per_gpu).normal(0, 1.0, (8, experts))) * 100)
    counts = replica_counts(load, layout, node_spread=0.0, keep_margin=0.0, previous_counts=None)
    per_replica = load / counts

    def max_loads(experts_of):
        gpu_loads = np.take_along_axis(per_replica[:, None, :].repeat(16, axis=1), experts_of,
                                       axis=2).sum(axis=2)
        return gpu_loads.max(axis=1)

    packed = packed_placement(load, counts, layout)
    assert np.all(np.bincount((packed + np.arange(8)[:, None, None] * experts).reshape(-1),
                              minlength=8 * experts).reshape(8, experts) == counts)
    assert max_loads(packed).sum() <= max_loads(dealt_placement(load, counts, layout)).sum()


def test_the_copy_budget_bounds_the_copies_the_swaps_add():
    layout = Layout(num_replicas=40, num_groups=1, num_nodes=2, num_gpus=8)
    rng = np.random.default_rng(3)
    first = np.round(np.exp(rng.normal(0, 1.2, (6, 32))) * 100)
    second = np.round(first * np.exp(rng.normal(0, 0.6, first.shape)))
    previous = tape_policy(first, layout, preset="balance")

    def copies(**params):
        placement = tape_policy(second, layout, previous=previous, preset="balance",
                                migration_weight=0.0, **params)
        before = previous.phy2log.reshape(6, 8, 5)
        after = placement.phy2log.reshape(6, 8, 5)
        held = (before[:, :, :, None] == np.arange(32)).any(axis=2)  # [L, G, E]
        return (~np.take_along_axis(held, after, axis=2)).sum(axis=(1, 2))  # [L]

    refill_only = copies(search_rounds=0)
    free = copies()
    budgeted = copies(copy_budget=0.1)
    assert free.sum() > budgeted.sum()
    # a swap adds at most two copies: a layer stops within two of its budget (4 of 40 slots)
    assert np.all(budgeted <= np.maximum(refill_only, 4) + 2)
