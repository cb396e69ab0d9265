"""The `tape` policy's rules that follow the shape: the node bonus per inter-node token saved,
the first placement by DeepSeek's packing greedy, the copy charge in slot loads, the copy
budget of the swaps, the peak rounds (each layer's heaviest GPU with its best partner) and
their pooled budget, the newest window as the forecast at one slot a GPU."""

import numpy as np
import pytest
from conftest import dealt_placement
from test_policies import plain_counts_with_bonuses
from test_tape_policy import drifted, skewed_load

import tape.policies.tape  # noqa: F401  (registers "tape")
from tape import Layout
from tape.policies.tape import tape_policy
from tape.policies.tape.counts import replica_counts
from tape.policies.tape.packing import packed_placement
from tape.policies.tape.search import relieve_peaks
from tape.policies.tape.state import SlotState


@pytest.mark.parametrize("gpus, nodes", [(8, 2), (16, 8), (32, 16)])
def test_the_node_bonus_is_the_inter_node_tokens_a_replica_saves(gpus, nodes):
    layout = Layout(num_replicas=2 * gpus, num_groups=1, num_nodes=nodes, num_gpus=gpus)
    load = np.random.default_rng(gpus).random((3, gpus)) ** 3 * 1000
    counts = replica_counts(load, layout, node_spread=1.2, keep_margin=0.0, previous_counts=None)
    # the j-th replica (j <= N) saves load / N inter-node tokens, each worth node_spread
    for layer in range(3):
        assert counts[layer].tolist() == plain_counts_with_bonuses(
            load[layer], layout.num_replicas, node_bonus=1.2 / nodes, num_nodes=nodes).tolist()


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


def plain_best_peak_swap(state, layer, partners, migration_weight, locality_weight):
    """Plain loops: the swap of the layer's heaviest GPU with a slot of one of its `partners`
    lightest GPUs that lowers the objective most (the pair's larger load, in mean GPU loads,
    plus the charges), among those that lower the heavy GPU's load; None if none does."""
    layout, load = state.layout, state.load[layer]
    mean = load.sum() / layout.num_gpus
    experts = state.experts[layer].tolist()
    before = [set(np.flatnonzero(row)) for row in state.held_before[layer]]
    per_replica = load / state.counts[layer]
    gpu_load = [sum(per_replica[e] for e in row) for row in experts]
    heavy = int(np.argmax(gpu_load))

    def charges(placement):
        moves = sum(e not in before[g] for g, row in enumerate(placement) for e in row)
        nodes = {e: {layout.gpu_node[g] for g, row in enumerate(placement) if e in row}
                 for e in range(len(load))}
        cross = sum(load[e] * (layout.num_nodes - len(n)) / layout.num_nodes
                    for e, n in nodes.items())
        return migration_weight * moves + locality_weight * cross / load.sum()

    start, best = gpu_load[heavy] / mean + charges(experts), None
    for light in np.argsort(gpu_load, kind="stable")[:partners]:
        for i, give in enumerate(experts[heavy]):
            for j, take in enumerate(experts[light]):
                if light == heavy or give in experts[light] or take in experts[heavy]:
                    continue
                swapped = [row.copy() for row in experts]
                swapped[heavy][i], swapped[light][j] = take, give
                larger = max(sum(per_replica[e] for e in swapped[heavy]),
                             sum(per_replica[e] for e in swapped[light]))
                if larger >= gpu_load[heavy]:
                    continue  # the heavy GPU's load must fall, and the partner stay below it
                gain = start - larger / mean - charges(swapped)
                if gain > 1e-9 and (best is None or gain > best[0] + 1e-9):
                    best = (gain, {(heavy, i), (int(light), j)})
    return best


@pytest.mark.parametrize("migration_weight, locality_weight", [(0.0, 0.0), (0.3, 0.0),
                                                                (0.05, 50.0)])
def test_one_peak_round_makes_the_plain_loop_best_swap(migration_weight, locality_weight):
    layout = Layout(num_replicas=24, num_groups=1, num_nodes=3, num_gpus=12)  # k = 2
    rng = np.random.default_rng(8)
    load = np.round(np.exp(rng.normal(0.0, 1.0, (5, 20))) * 100.0)
    counts = replica_counts(load, layout, node_spread=0.0, keep_margin=0.0, previous_counts=None)
    experts = dealt_placement(load, counts, layout)
    experts = np.stack([layer[rng.permutation(layout.num_gpus)] for layer in experts])
    state = SlotState.build(load, experts.copy(), layout, in_force=True)
    state.held_before = state.held_before[:, rng.permutation(layout.num_gpus)]  # other GPUs
    partners = 4
    expected = [plain_best_peak_swap(state, layer, partners, migration_weight, locality_weight)
                for layer in range(5)]
    assert sum(best is not None for best in expected) >= 3  # the test exercises swaps
    relieve_peaks(state, rounds=1, partners=partners, migration_weight=migration_weight,
                  locality_weight=locality_weight)
    for layer, best in enumerate(expected):
        changed = {tuple(slot) for slot in np.argwhere(state.experts[layer] != experts[layer])}
        assert changed == (set() if best is None else best[1])


def test_peak_rounds_lower_the_peaks_with_two_slots_a_gpu_within_a_pooled_budget():
    layout = Layout(num_replicas=48, num_groups=1, num_nodes=6, num_gpus=24)  # k = 2
    rng = np.random.default_rng(5)
    first = np.round(np.exp(rng.normal(0, 1.0, (8, 40))) * 100)
    second = np.round(first * np.exp(rng.normal(0, 0.5, first.shape)))
    previous = tape_policy(first, layout)

    def run(**params):
        placement = tape_policy(second, layout, previous=previous, smoothing_floor=1.0,
                                **params)
        before = previous.phy2log.reshape(8, 24, 2)
        after = placement.phy2log.reshape(8, 24, 2)
        held = (before[:, :, :, None] == np.arange(40)).any(axis=2)  # [L, G, E]
        copies = (~np.take_along_axis(held, after, axis=2)).sum(axis=(1, 2))  # [L]
        return placement.gpu_loads(second, 24).max(axis=1), copies

    peaks_with, copies_with = run(peak_rounds=8, copy_budget=0.15)
    peaks_without, copies_without = run(peak_rounds=0, copy_budget=0.15)
    assert peaks_with.sum() < 0.97 * peaks_without.sum()
    # the peak rounds spend the copies all layers leave unused: in total within the budget,
    # but a layer may pass its own share (7.2 of 48 slots)
    assert copies_without.sum() < copies_with.sum() <= 0.15 * 8 * 48
    assert copies_with.max() > 0.15 * 48


def test_peak_rounds_leave_one_slot_a_gpu_alone():
    layout = Layout(num_replicas=16, num_groups=1, num_nodes=4, num_gpus=16)  # k = 1
    rng = np.random.default_rng(6)
    first = np.round(np.exp(rng.normal(0, 1.0, (4, 12))) * 100)
    second = np.round(first * np.exp(rng.normal(0, 0.5, first.shape)))
    previous = tape_policy(first, layout)
    with_peaks = tape_policy(second, layout, previous=previous, peak_rounds=8)
    without = tape_policy(second, layout, previous=previous, peak_rounds=0)
    assert np.array_equal(with_peaks.phy2log, without.phy2log)


def test_one_slot_a_gpu_forecasts_the_newest_window():
    layout = Layout(num_replicas=16, num_groups=1, num_nodes=4, num_gpus=16)  # k = 1
    base = skewed_load(7, layers=4, experts=12)
    history = np.stack([drifted(base, seed, 0.5) for seed in range(6)])  # noise, no trend
    weight = drifted(base, 6, 0.5)
    previous = tape_policy(history[-1], layout)
    with_history = tape_policy(weight, layout, previous=previous, history=history)
    assert with_history == tape_policy(weight, layout, previous=previous)
    # two slots a GPU: the same history is averaged, and the plan changes
    two = Layout(num_replicas=32, num_groups=1, num_nodes=4, num_gpus=16)
    previous = tape_policy(history[-1], two)
    assert (tape_policy(weight, two, previous=previous, history=history)
            != tape_policy(weight, two, previous=previous))
