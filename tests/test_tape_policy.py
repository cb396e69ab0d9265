"""Tests of the `tape` policy: invariants, determinism, migration, locality, parameters."""

import numpy as np
import pytest
from conftest import dealt_placement
from hypothesis import given, settings
from hypothesis import strategies as st

import tape.policies.tape  # noqa: F401  (registers "tape")
from tape import Layout, Placement
from tape.policies import PolicyError, get_policy
from tape.policies.tape import (
    PARAMETER_HELP,
    PARAMETERS,
    PRESETS,
    SEARCH_SPACE,
    Parameter,
    tape_policy,
)
from tape.policies.tape.counts import replica_counts
from tape.policies.tape.forecast import CANDIDATES, forecast_load, smoothing_coefficients
from tape.policies.tape.packing import (
    keep_previous_slots,
    reassign_replicas,
    repair_duplicates,
)
from tape.policies.tape.search import balance_by_swaps
from tape.policies.tape.state import SlotState

LAYOUT = Layout(num_replicas=40, num_groups=4, num_nodes=2, num_gpus=8)  # k = 5, E = 32


def skewed_load(seed, layers=6, experts=32, skew=1.0):
    rng = np.random.default_rng(seed)
    return np.round(np.exp(rng.normal(0.0, skew, size=(layers, experts))) * 100.0)


def drifted(load, seed, amount=0.3):
    rng = np.random.default_rng(seed)
    return np.round(load * np.exp(rng.normal(0.0, amount, size=load.shape)))


def check_invariants(placement, layout, weight):
    """Plain-loop checks of what every tape placement must satisfy."""
    num_layers, num_experts = weight.shape
    assert placement.phy2log.shape == (num_layers, layout.num_replicas)
    per_gpu = layout.slots_per_gpu
    for layer in range(num_layers):
        row = placement.phy2log[layer].tolist()
        assert sorted(set(row)) == list(range(num_experts)), "every expert has a replica"
        for gpu in range(layout.num_gpus):
            slots = row[gpu * per_gpu:(gpu + 1) * per_gpu]
            assert len(set(slots)) == len(slots), "no expert twice on a GPU"
        for expert in range(num_experts):
            assert placement.logcnt[layer, expert] == row.count(expert)
            listed = [s for s in placement.log2phy[layer, expert] if s >= 0]
            assert sorted(listed) == [s for s, e in enumerate(row) if e == expert]


def moved_experts(before, after, layout):
    """Plain loop: changed slots whose GPU did not hold the expert before."""
    per_gpu = layout.slots_per_gpu
    moved = 0
    for layer in range(before.shape[0]):
        for slot in range(before.shape[1]):
            if before[layer, slot] != after[layer, slot]:
                gpu = slot // per_gpu
                if after[layer, slot] not in before[layer, gpu * per_gpu:(gpu + 1) * per_gpu]:
                    moved += 1
    return moved


def gpu_balancedness(placement, weight, layout):
    loads = placement.gpu_loads(weight, layout.num_gpus)
    return loads.mean(axis=1).sum() / loads.max(axis=1).sum()


def inter_node_tokens(placement, weight, layout):
    """Locality dispatch: tokens of nodes without a replica of the expert cross nodes."""
    total = 0.0
    per_node = layout.gpus_per_node * layout.slots_per_gpu
    for layer in range(weight.shape[0]):
        for expert in range(weight.shape[1]):
            nodes = {slot // per_node for slot in range(layout.num_replicas)
                     if placement.phy2log[layer, slot] == expert}
            total += weight[layer, expert] * (layout.num_nodes - len(nodes)) / layout.num_nodes
    return total


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_invariants_without_and_with_previous(preset):
    first = skewed_load(0)
    placement = tape_policy(first, LAYOUT, preset=preset)
    check_invariants(placement, LAYOUT, first)
    second = drifted(first, 1)
    following = tape_policy(second, LAYOUT, previous=placement, history=first[None], preset=preset)
    check_invariants(following, LAYOUT, second)


def test_registered_and_deterministic():
    policy = get_policy("tape")
    weight = skewed_load(2)
    first = policy(weight, LAYOUT)
    assert first == policy(weight, LAYOUT)
    again = policy(drifted(weight, 3), LAYOUT, previous=first)
    assert again == policy(drifted(weight, 3), LAYOUT, previous=first)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    gpus_nodes=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 2)]),
    per_gpu=st.integers(1, 4),
    experts_over=st.integers(0, 6),
)
def test_invariants_on_random_and_degenerate_loads(data, gpus_nodes, per_gpu, experts_over):
    gpus, nodes = gpus_nodes
    slots = gpus * per_gpu
    experts = data.draw(st.integers(max(per_gpu, 1), slots))
    layout = Layout(num_replicas=slots, num_groups=1, num_nodes=nodes, num_gpus=gpus)
    values = st.sampled_from([0.0, 1.0, 3.0, 1000.0, 1e6])
    weight = np.array(data.draw(st.lists(values, min_size=2 * experts, max_size=2 * experts)))
    weight = weight.reshape(2, experts)
    placement = tape_policy(weight, layout)
    check_invariants(placement, layout, weight)
    following = tape_policy(weight[::-1].copy(), layout, previous=placement, history=weight[None])
    check_invariants(following, layout, weight)


def test_identical_load_keeps_every_slot():
    weight = skewed_load(4)
    placement = tape_policy(weight, LAYOUT)
    again = tape_policy(weight, LAYOUT, previous=placement, history=weight[None])
    assert moved_experts(placement.phy2log, again.phy2log, LAYOUT) == 0
    assert again is placement  # nothing changed: the placement in force is returned as is


@pytest.mark.parametrize("keep_balancedness", [1.0, 0.0])
def test_previous_with_two_replicas_on_a_gpu_is_repaired(keep_balancedness):
    weight = skewed_load(5, layers=2)
    bad = np.tile(np.concatenate([np.arange(32), [0, 0, 1, 1, 2, 2, 3, 3]]), (2, 1))
    placement = tape_policy(weight, LAYOUT, previous=Placement(bad, 32),
                            keep_balancedness=keep_balancedness)
    check_invariants(placement, LAYOUT, weight)


def plain_layer_balancedness(phy2log, weight, layout):
    """Per layer: mean / max GPU load, each slot carrying its expert's load / replica count."""
    values = []
    for layer in range(weight.shape[0]):
        row = phy2log[layer].tolist()
        gpus = [0.0] * layout.num_gpus
        for slot, expert in enumerate(row):
            gpus[slot // layout.slots_per_gpu] += weight[layer, expert] / row.count(expert)
        values.append(sum(gpus) / len(gpus) / max(gpus))
    return np.array(values)


def test_keep_balancedness_replans_only_the_layers_below_it():
    weight = skewed_load(7, layers=12)
    placement = tape_policy(weight, LAYOUT)
    new = drifted(weight, 8, amount=0.8)
    in_force = plain_layer_balancedness(placement.phy2log, new, LAYOUT)
    threshold = float(np.median(in_force))
    kept = in_force >= threshold
    assert 0 < kept.sum() < len(kept)
    result = tape_policy(new, LAYOUT, previous=placement, keep_balancedness=threshold)
    replanned = tape_policy(new, LAYOUT, previous=placement)  # every layer
    check_invariants(result, LAYOUT, new)
    np.testing.assert_array_equal(result.phy2log[kept], placement.phy2log[kept])
    np.testing.assert_array_equal(result.phy2log[~kept], replanned.phy2log[~kept])
    assert not np.array_equal(replanned.phy2log[~kept], placement.phy2log[~kept])
    # Nothing below the threshold: the placement in force is the answer, as it is.
    assert tape_policy(new, LAYOUT, previous=placement, keep_balancedness=0.0) is placement


def test_one_repair_swap_can_fix_two_duplicates():
    # GPU 0 holds expert 0 twice (slots 0, 1), GPU 1 expert 3 twice (slots 5, 6), all four at
    # load 5: trading a 0 for a 3 leaves the larger GPU load smallest (17, against 18 or 19 for
    # experts 5 or 4), and that one swap fixes both GPUs.
    layout = Layout(num_replicas=8, num_groups=1, num_nodes=1, num_gpus=2)
    load = np.array([[10.0, 1.0, 2.0, 10.0, 3.0, 4.0]])
    state = SlotState.build(load, np.array([[[0, 0, 1, 2], [4, 3, 3, 5]]]), layout)
    repair_duplicates(state, np.array([0]))
    assert [sorted(gpu) for gpu in state.experts[0].tolist()] == [[0, 1, 2, 3], [0, 3, 4, 5]]
    check_state(state)


def test_repair_prefers_the_preferred_slots():
    # GPU 0 holds expert 0 twice. Trading it for expert 5 (load 6) leaves the larger GPU load
    # smallest (14); with expert 6's slot preferred, the 0 trades places with that one.
    layout = Layout(num_replicas=8, num_groups=1, num_nodes=1, num_gpus=2)
    load = np.array([[10.0, 1.0, 2.0, 3.0, 4.0, 6.0, 1.0]])
    experts = np.array([[[0, 0, 1, 2], [4, 3, 6, 5]]])
    plain = SlotState.build(load, experts.copy(), layout)
    repair_duplicates(plain, np.array([0]))
    assert [sorted(gpu) for gpu in plain.experts[0].tolist()] == [[0, 1, 2, 5], [0, 3, 4, 6]]
    steered = SlotState.build(load, experts.copy(), layout)
    preferred = np.zeros(8, dtype=bool)
    preferred[6] = True
    repair_duplicates(steered, np.array([0]), preferred=preferred)
    assert [sorted(gpu) for gpu in steered.experts[0].tolist()] == [[0, 1, 2, 6], [0, 3, 4, 5]]
    check_state(steered)


def check_state(state):
    """Plain loops: the state's bookkeeping agrees with its experts."""
    layout, (num_layers, num_experts) = state.layout, state.load.shape
    for layer in range(num_layers):
        rows = state.experts[layer].tolist()
        assert all(len(set(row)) == len(row) for row in rows), "no expert twice on a GPU"
        for gpu, row in enumerate(rows):
            assert set(np.flatnonzero(state.held[layer, gpu])) == set(row)
            load = sum(state.load[layer, e] / state.counts[layer, e] for e in row)
            assert np.isclose(state.gpu_load[layer, gpu], load)
        for node in range(layout.num_nodes):
            gpus = range(node * layout.gpus_per_node, (node + 1) * layout.gpus_per_node)
            for expert in range(num_experts):
                assert state.node_replicas[layer, node, expert] == sum(
                    rows[g].count(expert) for g in gpus)


@pytest.mark.parametrize("seed", range(4))
def test_refill_and_swaps_keep_the_bookkeeping_right(seed):
    # 4 GPUs of 6 slots for 12 experts: hot experts get several replicas, and new replicas
    # often find only GPUs that already hold their expert (the duplicate repair runs).
    layout = Layout(num_replicas=24, num_groups=1, num_nodes=2, num_gpus=4)
    first, second = skewed_load(seed, layers=8, experts=12, skew=1.5), skewed_load(
        seed + 50, layers=8, experts=12, skew=1.5)
    counts = replica_counts(first, layout, node_spread=0.0, keep_margin=0.0, previous_counts=None)
    state = SlotState.build(second, dealt_placement(first, counts, layout), layout,
                            in_force=True)
    new_counts = replica_counts(second, layout, node_spread=1.0, keep_margin=0.0,
                                previous_counts=state.counts)
    reassign_replicas(state, new_counts, migration_weight=0.05, locality_weight=20.0)
    assert np.array_equal(state.counts, new_counts)
    check_state(state)
    balance_by_swaps(state, rounds=3, pairs=2, migration_weight=0.05, locality_weight=20.0,
                     tolerance=0.0)
    check_state(state)


def test_balance_preset_beats_a_plain_round_robin():
    weight = skewed_load(6, skew=1.5)
    placement = tape_policy(weight, LAYOUT, preset="balance")
    round_robin = Placement(np.tile(np.arange(40) % 32, (6, 1)), 32)
    assert gpu_balancedness(placement, weight, LAYOUT) > gpu_balancedness(round_robin, weight, LAYOUT)
    assert gpu_balancedness(placement, weight, LAYOUT) > 0.9


def run_pairs(weights, layout, **params):
    """Protocol in miniature: placement i from window i, previous passed along; sums."""
    previous, moved, balance, ib = None, 0, [], 0.0
    for index in range(len(weights) - 1):
        history = weights[:index] if index else None
        placement = tape_policy(weights[index], layout, previous=previous, history=history, **params)
        if previous is not None:
            moved += moved_experts(previous.phy2log, placement.phy2log, layout)
        balance.append(gpu_balancedness(placement, weights[index + 1], layout))
        ib += inter_node_tokens(placement, weights[index + 1], layout)
        previous = placement
    return moved, float(np.mean(balance)), ib


@pytest.fixture(scope="module")
def drifting_windows():
    base = skewed_load(7, layers=4, skew=1.2)
    return np.stack([drifted(base, seed, 0.4) for seed in range(5)])


def test_higher_migration_weight_moves_fewer_experts(drifting_windows):
    low, _, _ = run_pairs(drifting_windows, LAYOUT, preset="balance-migration", migration_weight=0.0)
    high, _, _ = run_pairs(drifting_windows, LAYOUT, preset="balance-migration", migration_weight=0.2)
    assert high < low


def test_keep_margin_keeps_replica_counts(drifting_windows):
    def count_changes(margin):
        previous, changes = None, 0
        for weight in drifting_windows:
            placement = tape_policy(weight, LAYOUT, previous=previous, keep_margin=margin)
            if previous is not None:
                changes += int(np.abs(placement.logcnt - previous.logcnt).sum())
            previous = placement
        return changes
    assert count_changes(0.3) < count_changes(0.0)


def test_node_spread_cuts_inter_node_tokens(drifting_windows):
    _, _, plain = run_pairs(drifting_windows, LAYOUT, preset="balance", locality_weight=100.0)
    _, _, spread = run_pairs(drifting_windows, LAYOUT, preset="balance", locality_weight=100.0,
                             node_spread=2.0)
    assert spread < plain


def test_locality_weight_cuts_inter_node_tokens(drifting_windows):
    _, _, plain = run_pairs(drifting_windows, LAYOUT, preset="balance", node_spread=2.0)
    _, _, spread = run_pairs(drifting_windows, LAYOUT, preset="balance", node_spread=2.0,
                             locality_weight=100.0)
    assert spread < plain


def test_tolerance_and_rounds_limit_the_search():
    weight = skewed_load(8, skew=1.5)
    tight = tape_policy(weight, LAYOUT, preset="balance")
    loose = tape_policy(weight, LAYOUT, preset="balance", tolerance=0.5)
    none = tape_policy(weight, LAYOUT, preset="balance", search_rounds=0)
    assert gpu_balancedness(tight, weight, LAYOUT) > gpu_balancedness(loose, weight, LAYOUT)
    assert gpu_balancedness(tight, weight, LAYOUT) > gpu_balancedness(none, weight, LAYOUT)


def test_pairs_per_round_changes_the_search():
    weight = skewed_load(9, skew=1.5)
    one = tape_policy(weight, LAYOUT, preset="balance", pairs_per_round=1, search_rounds=2)
    four = tape_policy(weight, LAYOUT, preset="balance", pairs_per_round=4, search_rounds=2)
    assert gpu_balancedness(four, weight, LAYOUT) > gpu_balancedness(one, weight, LAYOUT)


def test_smoothing_floor_lets_noisy_history_be_averaged():
    base = skewed_load(10)
    history = np.stack([drifted(base, seed, 0.5) for seed in range(11, 15)])  # noise, no trend
    weight = drifted(base, 15, 0.5)
    newest = tape_policy(weight, LAYOUT, history=history, smoothing_floor=1.0)
    smoothed = tape_policy(weight, LAYOUT, history=history, smoothing_floor=0.1)
    assert newest == tape_policy(weight, LAYOUT)
    assert smoothed != newest


def test_forecast_backtests_its_smoothing():
    a, b, c = [1.0, 3.0], [3.0, 1.0], [1.0, 3.0]  # shares swing 1/4, 3/4 <-> 3/4, 1/4
    history, weight = np.array([[a], [b]]), np.array([c])
    # Smoothing s predicts b from a with error 0.5 and c from a + s (b - a) with error 0.5 s^2:
    # the floor 0.5 wins. Its level: a + 0.5 (b - a) = (1/2, 1/2), then + 0.5 (c - that) =
    # (3/8, 5/8), times c's total 4.
    assert np.allclose(forecast_load(weight, history, 0.5), [[1.5, 2.5]])
    assert np.array_equal(forecast_load(weight, history, 1.0), weight)
    # With one earlier window every smoothing predicts equally well: the newest window wins.
    assert np.array_equal(forecast_load(weight, history[:1], 0.5), weight)
    steady = np.array([[a], [a], [a]])  # a steady trace: the newest window is best
    assert np.allclose(forecast_load(np.array([a]), steady, 0.1), [a])


def plain_forecast(weight, history, floor):
    """The forecast read as plain loops: backtest every smoothing, keep the best level."""
    windows = list(history[-15:]) + [weight]
    shares = [w / w.sum(axis=1, keepdims=True) for w in windows]
    best = None
    for smoothing in floor ** np.linspace(1.0, 0.0, CANDIDATES):
        level, error = shares[0].copy(), 0.0
        for window in shares[1:]:
            error += float(((level - window) ** 2).sum())
            level = level + smoothing * (window - level)
        if best is None or error <= best[0] * (1 + 1e-9):  # the largest smoothing on ties
            best = (error, level)
    level = best[1]
    return level / level.sum(axis=1, keepdims=True) * weight.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("floor", [0.1, 0.4])
def test_forecast_matches_a_plain_loop_backtest(floor):
    rng = np.random.default_rng(20)
    base = rng.random((3, 16)) * 100 + 1
    windows = np.array([base * np.exp(rng.normal(0, 0.6, base.shape)) for _ in range(20)])
    for count in (2, 5, 20):  # more than 16 windows: only the last 16 are read
        expected = plain_forecast(windows[count - 1], windows[:count - 1], floor)
        assert np.allclose(forecast_load(windows[count - 1], windows[:count - 1], floor), expected)


def test_smoothing_coefficients_by_hand():
    # Smoothing 1/2 over 3 windows: level_0 = s0, level_1 = s0/2 + s1/2,
    # level_2 = s0/4 + s1/4 + s2/2.
    weights = smoothing_coefficients(np.array([0.5]), 3)[0]
    assert np.allclose(weights, [[1, 0, 0], [0.5, 0.5, 0], [0.25, 0.25, 0.5]])


def plain_eplb_counts(load, slots):
    """DeepSeek EPLB's replicate_experts, read as a plain loop: next slot to max load/count."""
    counts = [1] * len(load)
    for _ in range(slots - len(load)):
        best = max(range(len(load)), key=lambda e: (load[e] / counts[e], -e))
        counts[best] += 1
    return counts


def test_replica_counts_are_eplbs_without_spread_or_margin():
    rng = np.random.default_rng(13)
    load = rng.random((5, 32)) ** 3 * 1000
    counts = replica_counts(load, LAYOUT, node_spread=0.0, keep_margin=0.0, previous_counts=None)
    for layer in range(5):
        assert counts[layer].tolist() == plain_eplb_counts(load[layer].tolist(), 40)


def test_replica_count_ties_go_to_the_lowest_expert():
    # Integer loads with many equal per-replica loads (8 / 2 = 4 = 4 / 1): EPLB's greedy takes
    # the lowest expert among equals at every step.
    load = np.array([[8.0, 4.0, 4.0, 2.0, 2.0, 2.0, 1.0, 1.0] * 4])
    counts = replica_counts(load, LAYOUT, node_spread=0.0, keep_margin=0.0, previous_counts=None)
    assert counts[0].tolist() == plain_eplb_counts(load[0].tolist(), 40)


def test_node_spread_and_keep_margin_steer_replica_counts():
    layout = Layout(num_replicas=8, num_groups=1, num_nodes=2, num_gpus=4)
    load = np.array([[10.0, 9.0, 1.0, 1.0]])
    plain = replica_counts(load, layout, node_spread=0.0, keep_margin=0.0, previous_counts=None)
    assert plain.tolist() == [[3, 3, 1, 1]]  # 10/1, 9/1, 10/2, 9/2 win the 4 spare slots
    # A second replica adds a node: worth f + 10 f, more than any third replica (f / 2).
    spread = replica_counts(load, layout, node_spread=10.0, keep_margin=0.0, previous_counts=None)
    assert spread.tolist() == [[2, 2, 2, 2]]
    previous = np.array([[1, 1, 3, 3]])
    kept = replica_counts(load, layout, node_spread=0.0, keep_margin=100.0,
                          previous_counts=previous)
    assert kept.tolist() == previous.tolist()


def test_dealt_placement_spreads_replicas_over_gpus_and_nodes():
    layout = Layout(num_replicas=16, num_groups=1, num_nodes=2, num_gpus=4)
    load = np.array([[40.0, 30.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    counts = np.array([[4, 3, 2, 1, 1, 1, 1, 1, 1, 1]])
    experts = dealt_placement(load, counts, layout)[0]  # [G, k]
    for gpu in range(4):
        assert len(set(experts[gpu].tolist())) == 4
    nodes_of = {e: {g // 2 for g in range(4) if e in experts[g]} for e in (0, 1, 2)}
    assert nodes_of == {0: {0, 1}, 1: {0, 1}, 2: {0, 1}}
    assert sorted(experts.reshape(-1).tolist()) == sorted(np.repeat(np.arange(10), counts[0]).tolist())


def test_keep_previous_slots_puts_staying_experts_back():
    previous = np.array([[[0, 1, 2], [3, 4, 5]]])
    experts = np.array([[[2, 6, 0], [3, 4, 5]]])  # GPU 0 keeps 0 and 2, gets 6 for 1
    held_before = np.zeros((1, 2, 7), dtype=bool)
    held_before[0, 0, [0, 1, 2]] = True
    held_before[0, 1, [3, 4, 5]] = True
    kept = keep_previous_slots(experts, previous, held_before)
    assert kept.tolist() == [[[0, 6, 2], [3, 4, 5]]]


def plain_best_swap(state, layer, heavy, light, migration_weight, locality_weight):
    """The objective's best swap between two GPUs, read as plain loops (tape_state doc)."""
    layout, load = state.layout, state.load[layer]
    mean = load.sum() / layout.num_gpus
    node_of = layout.gpu_node
    experts = state.experts[layer].tolist()
    before = [set(np.flatnonzero(row)) for row in state.held_before[layer]]

    def objective(placement):
        gpu_load = [sum(load[e] / state.counts[layer, e] for e in row) for row in placement]
        moves = sum(e not in before[g] for g, row in enumerate(placement) for e in row)
        nodes = {e: {node_of[g] for g, row in enumerate(placement) if e in row} for e in
                 range(len(load))}
        cross = sum(load[e] * (layout.num_nodes - len(n)) / layout.num_nodes
                    for e, n in nodes.items())
        return (max(gpu_load[heavy], gpu_load[light]) / mean + migration_weight * moves
                + locality_weight * cross / load.sum())

    start, best = objective(experts), None
    heavy_load = sum(load[e] / state.counts[layer, e] for e in experts[heavy])
    for i, give in enumerate(experts[heavy]):
        for j, take in enumerate(experts[light]):
            if give in experts[light] or take in experts[heavy]:
                continue
            swapped = [row.copy() for row in experts]
            swapped[heavy][i], swapped[light][j] = take, give
            light_after = sum(load[e] / state.counts[layer, e] for e in swapped[light])
            heavy_after = sum(load[e] / state.counts[layer, e] for e in swapped[heavy])
            if max(heavy_after, light_after) >= heavy_load:
                continue  # the pair's larger load must fall
            gain = start - objective(swapped)
            if gain > 1e-9 and (best is None or gain > best[0] + 1e-9):
                best = (gain, i, j)
    return best


@pytest.mark.parametrize("migration_weight, locality_weight", [(0.0, 0.0), (0.3, 0.0),
                                                                (0.05, 50.0)])
def test_one_swap_round_makes_the_plain_loop_best_swap(migration_weight, locality_weight):
    rng = np.random.default_rng(21)
    load = np.round(np.exp(rng.normal(0.0, 1.0, (4, 32))) * 100.0)
    counts = replica_counts(load, LAYOUT, node_spread=0.0, keep_margin=0.0, previous_counts=None)
    experts = dealt_placement(load, counts, LAYOUT)
    experts = np.stack([layer[rng.permutation(LAYOUT.num_gpus)] for layer in experts])
    state = SlotState.build(load, experts.copy(), LAYOUT, in_force=True)
    state.held_before = state.held_before[:, rng.permutation(LAYOUT.num_gpus)]  # other GPUs
    gpu_load = state.gpu_load.copy()
    expected = []
    for layer in range(4):
        order = np.argsort(gpu_load[layer])
        heavy, light = order[-1], order[0]
        best = plain_best_swap(state, layer, heavy, light, migration_weight, locality_weight)
        expected.append(None if best is None else (heavy, best[1], light, best[2]))
    balance_by_swaps(state, rounds=1, pairs=1, migration_weight=migration_weight,
                     locality_weight=locality_weight, tolerance=0.0)
    for layer, swap in enumerate(expected):
        changed = np.argwhere(state.experts[layer] != experts[layer])
        if swap is None:
            assert len(changed) == 0
        else:
            heavy, i, light, j = swap
            assert sorted(map(tuple, changed.tolist())) == sorted([(heavy, i), (light, j)])
            assert state.experts[layer, heavy, i] == experts[layer, light, j]


def test_presets_and_search_space_cover_every_parameter():
    assert set(PRESETS) == {"balance", "balance-migration", "all", "fast"}
    names = [parameter.name for parameter in PARAMETERS]
    assert len(set(names)) == len(names)
    for values in PRESETS.values():
        assert list(values) == names
    assert list(SEARCH_SPACE) == names and list(PARAMETER_HELP) == names
    for parameter in PARAMETERS:
        for value in parameter.presets:  # every preset's value passes its own check
            assert parameter.checked(value) == value
        low, high, kind = parameter.search
        assert low < high and kind == ("int" if parameter.integer else kind)
        assert kind in ("float", "int", "log") and (kind != "log" or low > 0)
        assert parameter.checked(low) == low and parameter.checked(high) == high
        # the top of the searched range is a value the policy runs with
        assert tape_policy(skewed_load(0), LAYOUT, preset="fast", **{parameter.name: high})


def test_a_parameter_checks_its_own_range():
    floor = Parameter("floor", "x", (0.5,) * 4, (0.1, 1.0, "float"), high=1.0, low_open=True)
    rounds = Parameter("rounds", "x", (1,) * 4, (0, 4, "int"), integer=True)
    assert floor.checked(1) == 1.0 and isinstance(floor.checked(1), float)
    assert rounds.checked(np.int64(3)) == 3 and isinstance(rounds.checked(np.int64(3)), int)
    with pytest.raises(PolicyError, match=r"floor must be in \(0, 1\], got 0"):
        floor.checked(0)
    with pytest.raises(PolicyError, match="rounds must be an integer, got 1.5"):
        rounds.checked(1.5)
    with pytest.raises(PolicyError, match="rounds must be an integer, got True"):
        rounds.checked(True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "turbo"}, "unknown tape preset"),
        ({"speed": 3}, "unknown tape parameter"),
        ({"smoothing_floor": 0.0}, r"smoothing_floor must be in \(0, 1\], got 0.0"),
        ({"smoothing_floor": 1.5}, r"smoothing_floor must be in \(0, 1\], got 1.5"),
        ({"migration_weight": -1.0}, "migration_weight"),
        ({"search_rounds": 2.5}, "search_rounds"),
        ({"pairs_per_round": 0}, "pairs_per_round"),
        ({"locality_weight": float("nan")}, "locality_weight"),
        ({"tolerance": True}, "tolerance"),
        ({"keep_balancedness": 1.5}, "keep_balancedness must be in \\[0, 1\\]"),
        ({"search_rounds": 10**20}, r"search_rounds must be in \[0, 1e\+06\]"),
        ({"locality_weight": 1e300}, r"locality_weight must be in \[0, 1e\+06\]"),
    ],
)
def test_bad_parameters_are_rejected(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        tape_policy(skewed_load(0), LAYOUT, **kwargs)


def test_bad_inputs_are_rejected_where_they_enter():
    # Checked once, by the trace's rule set, in tape.api.place (the policy trusts its inputs);
    # the policy's own need, no more slots a GPU than experts, by the policy.
    from tape.api import place
    from tape.errors import PlacementError, TraceError

    with pytest.raises(TraceError, match="weight: load of expert 0 in layer 0 is negative"):
        place(-skewed_load(0), LAYOUT, "tape")
    with pytest.raises(TraceError, match=r"history must have shape \[windows, 6, 32\]"):
        place(skewed_load(0), LAYOUT, "tape", history=np.ones((2, 3, 32)))
    with pytest.raises(TraceError, match="history: load of expert 0 in layer 0 at window 0"):
        place(skewed_load(0), LAYOUT, "tape", history=np.full((2, 6, 32), np.nan))
    with pytest.raises(PlacementError, match="the previous placement has 5 layers"):
        place(skewed_load(0), LAYOUT, "tape",
              previous=Placement(np.tile(np.arange(40) % 32, (5, 1)), 32))
    with pytest.raises(PolicyError, match="slots per GPU"):
        tape_policy(np.ones((1, 2)), Layout(num_replicas=4, num_groups=1, num_nodes=1, num_gpus=1))
