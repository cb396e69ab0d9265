"""tape.metrics: cases worked by hand, random cross-checks against tests/plainloop.py, and the
two SPEC findings (communication blind to replica location; v4 weight copy rewards stacking)."""

import numpy as np
import plainloop
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tape import Layout, Placement, PlacementError, TapeError, TraceError
from tape.metrics import (
    SEED_VERSIONS,
    Timeline,
    balancedness_score,
    combined_score,
    communication_cost,
    communication_score,
    gpu_balancedness,
    speed_score,
    timeline,
    weight_copy_cost,
    weight_copy_score,
)
from tape.placement import PlacedWindow

# The worked example: 2 layers, 4 experts, 6 slots, 2 GPUs (k = 3 slots per GPU).
#   layer 0: phy2log = [0 1 0 | 2 3 0], logcnt = [3 1 1 1], weight = [6 3 2 1]
#            slot loads = [6/3, 3, 6/3 | 2, 1, 6/3] = [2 3 2 | 2 1 2]  (sum 12, mean 2, max 3)
#            GPU loads  = [7, 5]                                         (mean 6, max 7)
#   layer 1: phy2log = [1 2 3 | 0 1 2], logcnt = [1 2 2 1], weight = [4 8 2 5]
#            slot loads = [8/2, 2/2, 5 | 4, 8/2, 2/2] = [4 1 5 | 4 4 1] (sum 19, mean 19/6, max 5)
#            GPU loads  = [10, 9]                                        (mean 9.5, max 10)
PHY2LOG = np.array([[0, 1, 0, 2, 3, 0], [1, 2, 3, 0, 1, 2]])
WEIGHT = np.array([[6.0, 3.0, 2.0, 1.0], [4.0, 8.0, 2.0, 5.0]])
ONE_NODE = Layout(num_replicas=6, num_groups=1, num_nodes=1, num_gpus=2)
TWO_NODES = Layout(num_replicas=6, num_groups=1, num_nodes=2, num_gpus=2)
ON_ONE_NODE = PlacedWindow.checked(Placement(PHY2LOG, 4), WEIGHT, ONE_NODE)
ON_TWO_NODES = PlacedWindow.checked(Placement(PHY2LOG, 4), WEIGHT, TWO_NODES)


@pytest.fixture
def placement():
    return Placement(PHY2LOG, 4)


def test_balancedness_by_hand(placement):
    # (2 + 19/6) / (3 + 5) = (31/6) / 8 = 31/48
    assert balancedness_score(ON_ONE_NODE) == pytest.approx(31 / 48, rel=1e-12)


def test_gpu_balancedness_by_hand(placement):
    # (6 + 9.5) / (7 + 10) = 15.5 / 17 = 31/34, whatever the nodes
    for layout in (ONE_NODE, TWO_NODES):
        window = PlacedWindow.checked(placement, WEIGHT, layout)
        assert gpu_balancedness(window) == pytest.approx(31 / 34, rel=1e-12)


def test_communication_one_node_by_hand(placement):
    # G = 2 on one node: cost 0 on the same GPU, 1 to the other.
    # Layer 0: e0 (6 tokens, 3 replicas: GPU0, GPU0, GPU1): t = 6/(2*3) = 1 per replica and
    #   source; GPU0 -> GPU1 replica: 1, GPU1 -> two GPU0 replicas: 2; cost 3.
    #   e1 (3 tokens on GPU0): GPU1 sends 3/2 -> 1.5. e2 (2 on GPU1): 1. e3 (1 on GPU1): 0.5.
    #   Layer 0 = 3 + 1.5 + 1 + 0.5 = 6.
    # Layer 1: e0 (4 on GPU1): 2. e1 (8, GPU0 and GPU1): t = 2, one crossing each way: 4.
    #   e2 (2, GPU0 and GPU1): t = 0.5, 2 crossings: 1. e3 (5 on GPU0): 2.5. Layer 1 = 9.5.
    # actual = 15.5. minimum (G/N = 2): tokens * (min(r, 2) - 1) / r summed over sources:
    #   e0 of layer 0: 6 * 1/3 = 2; e1 of layer 1: 8 * 1/2 = 4; e2 of layer 1: 2 * 1/2 = 1 -> 7.
    # total = 12 + 19 = 31.
    assert communication_cost(ON_ONE_NODE) == pytest.approx((15.5, 7.0, 31.0))
    # exposed(actual) = 15.5 - 3.1 = 12.4; exposed(minimum) = 7 - 3.1 = 3.9; 10 * 3.9 / 12.4
    assert communication_score(ON_ONE_NODE) == pytest.approx(39 / 12.4)


def test_communication_two_nodes_by_hand(placement):
    # One GPU a node: every crossing costs 18, so actual = 18 * 15.5 = 279. G/N = 1, so
    # min(r, 1) - 1 = 0 and minimum = 0; exposed(minimum) = 0 and the score is 0.
    assert communication_cost(ON_TWO_NODES) == pytest.approx((279.0, 0.0, 31.0))
    assert communication_score(ON_TWO_NODES) == 0.0


def test_communication_score_is_zero_when_nothing_is_exposed():
    # One GPU: nothing crosses, actual = 0 = exposed(actual) -> score 0 by definition.
    one_gpu = Layout(num_replicas=3, num_groups=1, num_nodes=1, num_gpus=1)
    placement = Placement([[0, 1, 0]], 2)
    window = PlacedWindow.checked(placement, [[4.0, 2.0]], one_gpu)
    assert communication_cost(window) == (0.0, 0.0, 6.0)
    assert communication_score(window) == 0.0


def test_weight_copy_slot_order_by_hand(placement):
    # Primaries in slot order. Layer 0: e0 primary slot 0 (GPU0); copies slot 2 (GPU0): 0 and
    # slot 5 (GPU1): 1. Layer 1: e1 primary slot 0 (GPU0), copy slot 4 (GPU1): 1; e2 primary
    # slot 1 (GPU0), copy slot 5 (GPU1): 1. actual = 3 on one node, 3 * 18 = 54 on two.
    # minimum: no expert has more than k = 3 replicas, so every copy fits on its primary's GPU: 0.
    assert weight_copy_cost(placement, ONE_NODE) == (3.0, 0.0)
    assert weight_copy_cost(placement, TWO_NODES) == (54.0, 0.0)
    assert weight_copy_score(placement, ONE_NODE) == 0.0  # min(0 / 3, 1)


def test_weight_copy_keeps_the_policy_order():
    # Same slots, but layer 0 lists e0 as [5, 0, 2]: primary slot 5 (GPU1), copies on GPU0 cost
    # 1 + 1 = 2; layer 1 unchanged (1 + 1). actual = 4 on one node, 72 on two.
    log2phy = np.array(
        [
            [[5, 0, 2], [1, -1, -1], [3, -1, -1], [4, -1, -1]],
            [[3, -1, -1], [0, 4, -1], [1, 5, -1], [2, -1, -1]],
        ]
    )
    placement = Placement.from_maps(PHY2LOG, log2phy, [[3, 1, 1, 1], [1, 2, 2, 1]])
    assert weight_copy_cost(placement, ONE_NODE) == (4.0, 0.0)
    assert weight_copy_cost(placement, TWO_NODES) == (72.0, 0.0)


def test_weight_copy_minimum_when_replicas_exceed_a_gpu():
    # 4 slots, 2 GPUs, k = 2: expert 0 in slots 0, 1 (GPU0) and 2 (GPU1), expert 1 in slot 3.
    # actual: slot 1 copies on GPU0 (0), slot 2 copies to GPU1 (1 in one node, 18 across).
    # minimum: 2 copies, k - 1 = 1 on the primary's GPU (0), the other in its node (1) -> 1.
    placement = Placement([[0, 0, 0, 1]], 2)
    one_node = Layout(num_replicas=4, num_groups=1, num_nodes=1, num_gpus=2)
    two_nodes = Layout(num_replicas=4, num_groups=1, num_nodes=2, num_gpus=2)
    assert weight_copy_cost(placement, one_node) == (1.0, 1.0)
    assert weight_copy_score(placement, one_node) == 1.0
    assert weight_copy_cost(placement, two_nodes) == (18.0, 1.0)
    assert weight_copy_score(placement, two_nodes) == pytest.approx(1 / 18)


def test_weight_copy_score_is_one_when_nothing_is_copied():
    placement = Placement([[0, 1, 2, 3, 4, 5]], 6)
    assert weight_copy_cost(placement, ONE_NODE) == (0.0, 0.0)
    assert weight_copy_score(placement, ONE_NODE) == 1.0


def test_speed_score():
    assert speed_score(0.01) == pytest.approx(2.0)
    assert speed_score(0.5) == pytest.approx(0.04)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(TapeError, match="positive finite"):
            speed_score(bad)


def test_combined_score_every_version_by_hand():
    parts = {"balancedness": 0.8, "speed": 0.4, "communication": 0.3, "weight_copy": 0.1}
    assert SEED_VERSIONS == (0, 2, 3, 4)
    assert combined_score(0, **parts) == pytest.approx((0.8 + 0.4) / 2)  # 0.6
    assert combined_score(2, **parts) == pytest.approx((0.8 + 0.3) / 2)  # 0.55
    assert combined_score(3, **parts) == pytest.approx((0.8 + 0.4 + 0.3) / 3)  # 0.5
    assert combined_score(4, **parts) == pytest.approx((0.8 + 0.4 + 0.3 + 0.1) / 4)  # 0.4
    assert combined_score(2, balancedness=0.8, communication=0.3) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "version, parts, message",
    [
        (1, {"balancedness": 1.0, "speed": 1.0}, "unknown TAPE version 1"),
        (0, {"balancedness": 1.0}, "missing: speed"),
        (3, {"balancedness": 1.0, "speed": 1.0}, "missing: communication"),
        (4, {"balancedness": 1.0, "speed": 1.0, "communication": 1.0}, "missing: weight_copy"),
    ],
)
def test_combined_score_rejects(version, parts, message):
    with pytest.raises(TapeError, match=message):
        combined_score(version, **parts)


def test_timeline_two_gpus_by_hand(placement):
    # A single send is ONE expert's tokens from one GPU to one replica: cost * slot load / G.
    # Layer 0 slot loads [2 3 2 | 2 1 2]: the largest single send into GPU 0 is 3 / 2 = 1.5,
    # into GPU 1 is 2 / 2 = 1. Layer 1 [4 1 5 | 4 4 1]: 5 / 2 = 2.5 and 4 / 2 = 2.
    # One node (cost 1): send = [1, 1.5], receive = [1.5, 1], comm = [1.5, 1.5]; layer 1
    # comm = [2.5, 2.5]. (Summed over experts, as an old reading had it, GPU 1 -> GPU 0 would
    # be 7 / 2 = 3.5.) Compute wins everywhere: work = compute = [17, 14] summed -> 15.5 / 17.
    one = timeline(ON_ONE_NODE)
    assert isinstance(one, Timeline)
    np.testing.assert_allclose(one.compute, [[7, 5], [10, 9]])
    np.testing.assert_allclose(one.comm, [[1.5, 1.5], [2.5, 2.5]])
    assert one.overall_balancedness == pytest.approx(31 / 34)
    assert one.compute_balancedness == pytest.approx(31 / 34)
    assert one.efficiency == pytest.approx(31 / 34)
    # Two nodes (cost 18): comm = [27, 27] and [45, 45] beat compute; summed work [72, 72]:
    # overall 1, compute 15.5 / 17, efficiency 15.5 / 72.
    two = timeline(ON_TWO_NODES)
    np.testing.assert_allclose(two.comm, [[27, 27], [45, 45]])
    assert two.summary() == pytest.approx(
        {"overall_balancedness": 1.0, "compute_balancedness": 31 / 34, "efficiency": 15.5 / 72}
    )


def test_timeline_spec_worked_example():
    # SPEC: one layer, 2 nodes x 1 GPU, 2 slots; e0 (load 8) on GPU 0, e1 (load 4) on GPU 1.
    # GPU 1 -> e0: 18 * 8 / 2 = 72; GPU 0 -> e1: 18 * 4 / 2 = 36. send = [36, 72],
    # receive = [72, 36], work = [72, 72]: overall 1, compute 6 / 8, efficiency 6 / 72.
    layout = Layout(num_replicas=2, num_groups=1, num_nodes=2, num_gpus=2)
    result = timeline(PlacedWindow.checked(Placement([[0, 1]], 2), [[8.0, 4.0]], layout))
    np.testing.assert_allclose(result.compute, [[8, 4]])
    np.testing.assert_allclose(result.work, [[72, 72]])
    assert result.summary() == pytest.approx(
        {"overall_balancedness": 1.0, "compute_balancedness": 0.75, "efficiency": 6 / 72}
    )


def test_timeline_send_and_receive_by_hand():
    # 4 GPUs, 2 nodes (GPUs 0, 1 | 2, 3), one slot each, loads [8, 4, 4, 0]: a single send into
    # GPU b costs c * load_b / 4 = c * [2, 1, 1, 0].
    #   send from GPU 0: max(1 * 1 (GPU 1), 18 * 1 (GPU 2)) = 18; GPU 1: max(1 * 2, 18 * 1) = 18
    #   send from GPU 2: max(1 * 0 (GPU 3), 18 * 2 (GPU 0)) = 36; GPU 3: max(1 * 1, 18 * 2) = 36
    #   receive (the dearest source is on the other node): 18 * [2, 1, 1, 0] = [36, 18, 18, 0]
    # comm = max(send, receive) = [36, 18, 36, 36], above compute [8, 4, 4, 0] everywhere.
    # overall = mean 31.5 / max 36 = 0.875; compute = mean 4 / max 8; efficiency = 4 / 36.
    layout = Layout(num_replicas=4, num_groups=1, num_nodes=2, num_gpus=4)
    placement = Placement([[0, 1, 2, 3]], 4)
    result = timeline(PlacedWindow.checked(placement, [[8.0, 4.0, 4.0, 0.0]], layout))
    np.testing.assert_allclose(result.comm, [[36, 18, 36, 36]])
    np.testing.assert_allclose(result.work, [[36, 18, 36, 36]])
    assert result.summary() == pytest.approx(
        {"overall_balancedness": 0.875, "compute_balancedness": 0.5, "efficiency": 1 / 9}
    )


def test_timeline_replicas_on_one_gpu_and_degenerate_layouts():
    # Expert 0 (load 12) has 3 replicas, two of them on GPU 0: each replica is its own single
    # send of 12 / (2 * 3) = 2 tokens (not 4 for the two together). Expert 1 (load 6) sits
    # alone on GPU 1: 6 / 2 = 3. One node: send = [3, 2], receive = [2, 3], comm = [3, 3].
    layout = Layout(num_replicas=4, num_groups=1, num_nodes=1, num_gpus=2)
    placement = Placement([[0, 0, 1, 0]], 2)
    result = timeline(PlacedWindow.checked(placement, [[12.0, 6.0]], layout))
    np.testing.assert_allclose(result.compute, [[8, 10]])
    np.testing.assert_allclose(result.comm, [[3, 3]])
    # One GPU: nothing is sent, work = compute, every ratio 1.
    single = timeline(PlacedWindow.checked(placement, [[12.0, 6.0]], Layout(4, 1, 1, 1)))
    np.testing.assert_allclose(single.comm, [[0]])
    assert single.summary() == {
        "overall_balancedness": 1.0, "compute_balancedness": 1.0, "efficiency": 1.0
    }


def test_all_zero_load_is_balanced(placement):
    zero = np.zeros_like(WEIGHT)
    assert balancedness_score(PlacedWindow.checked(placement, zero, ONE_NODE)) == 1.0
    assert gpu_balancedness(PlacedWindow.checked(placement, zero, ONE_NODE)) == 1.0
    assert communication_cost(PlacedWindow.checked(placement, zero, ONE_NODE)) == (0.0, 0.0, 0.0)
    assert communication_score(PlacedWindow.checked(placement, zero, ONE_NODE)) == 0.0
    assert timeline(PlacedWindow.checked(placement, zero, TWO_NODES)).summary() == {
        "overall_balancedness": 1.0,
        "compute_balancedness": 1.0,
        "efficiency": 1.0,
    }


@pytest.mark.parametrize(
    "weight, message",
    [
        (np.ones((2, 5)), r"weight has 5 experts, expected 4 \(shape \(2, 5\)\)"),
        (np.ones((3, 4)), r"weight has 3 layers, expected 2"),
        (np.ones(4), r"\[layers, experts\], all non-empty, got \(4,\)"),
        (np.array([[1.0, np.nan, 1, 1], [1, 1, 1, 1]]), "expert 1 in layer 0 is nan"),
        (np.array([[1.0, -1, 1, 1], [1, 1, 1, 1]]), "expert 1 in layer 0 is negative"),
        (np.full((2, 4), 2.0**53 + 2), "more than 9007199254740992"),
        (np.array([["a"] * 4] * 2), "must be numbers"),
    ],
)
def test_bad_weight_is_refused_at_the_door(placement, weight, message):
    # One check, by the trace's rule set, where a load meets a placement; metrics trust it.
    with pytest.raises(TraceError, match=message):
        PlacedWindow.checked(placement, weight, ONE_NODE)


def test_placement_must_fit_the_layout(placement):
    wrong = Layout(num_replicas=8, num_groups=1, num_nodes=1, num_gpus=2)
    for call in (
        lambda: PlacedWindow.checked(placement, WEIGHT, wrong),
        lambda: weight_copy_score(placement, wrong),
    ):
        with pytest.raises(PlacementError, match="num_replicas = 8"):
            call()


# ---- random cross-checks against the plain-loop readings -------------------------------------


def random_placement(rng, num_layers, num_experts, num_slots):
    """Every expert present in every layer, extra slots random, log2phy in a random order."""
    phy2log = np.stack(
        [
            rng.permutation(
                np.concatenate(
                    [np.arange(num_experts), rng.integers(0, num_experts, num_slots - num_experts)]
                )
            )
            for _ in range(num_layers)
        ]
    )
    logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    log2phy = np.full((num_layers, num_experts, int(logcnt.max())), -1)
    for layer in range(num_layers):
        for expert in range(num_experts):
            slots = rng.permutation(np.flatnonzero(phy2log[layer] == expert))
            log2phy[layer, expert, : len(slots)] = slots
    return Placement.from_maps(phy2log, log2phy, logcnt)


def random_weight(rng, kind, num_layers, num_experts):
    if kind == "zero":
        return np.zeros((num_layers, num_experts))
    if kind == "one_hot":
        weight = np.zeros((num_layers, num_experts))
        weight[np.arange(num_layers), rng.integers(0, num_experts, num_layers)] = rng.uniform(
            1, 1e4
        )
        return weight
    if kind == "integer":
        return rng.integers(0, 50, (num_layers, num_experts)).astype(float)
    return rng.pareto(1.5, (num_layers, num_experts)) * 1000  # skewed


def assert_matches_plain_loop(placement, weight, layout):
    def close(value, reference):
        assert np.allclose(value, reference, rtol=1e-9, atol=1e-12), (value, reference)

    window = PlacedWindow.checked(placement, weight, layout)
    close(balancedness_score(window), plainloop.balancedness_score(placement, weight))
    close(gpu_balancedness(window), plainloop.gpu_balancedness(placement, weight, layout))
    close(communication_cost(window), plainloop.communication_cost(placement, weight, layout))
    close(communication_score(window), plainloop.communication_score(placement, weight, layout))
    close(weight_copy_cost(placement, layout), plainloop.weight_copy_cost(placement, layout))
    close(weight_copy_score(placement, layout), plainloop.weight_copy_score(placement, layout))
    reference = plainloop.timeline(placement, weight, layout)
    summary = timeline(window).summary()
    assert summary.keys() == reference.keys()
    for name in reference:
        close(summary[name], reference[name])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    num_nodes=st.integers(1, 3),
    gpus_per_node=st.integers(1, 3),
    slots_per_gpu=st.integers(1, 4),
    num_layers=st.integers(1, 3),
    expert_fraction=st.floats(0.0, 1.0),
    kind=st.sampled_from(["skewed", "integer", "zero", "one_hot"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_plain_loop_on_random_placements(
    num_nodes, gpus_per_node, slots_per_gpu, num_layers, expert_fraction, kind, seed
):
    num_gpus = num_nodes * gpus_per_node
    num_slots = num_gpus * slots_per_gpu
    num_experts = max(1, round(expert_fraction * num_slots))
    layout = Layout(num_slots, 1, num_nodes, num_gpus)
    rng = np.random.default_rng(seed)
    placement = random_placement(rng, num_layers, num_experts, num_slots)
    assert_matches_plain_loop(placement, random_weight(rng, kind, num_layers, num_experts), layout)


@pytest.mark.parametrize("kind", ["skewed", "one_hot"])
def test_matches_plain_loop_at_deepseek_scale(kind):
    layout = Layout()  # 288 slots, 8 groups, 4 nodes, 32 GPUs
    rng = np.random.default_rng(7)
    placement = random_placement(rng, 2, 256, layout.num_replicas)
    assert_matches_plain_loop(placement, random_weight(rng, kind, 2, 256), layout)


# ---- the two SPEC findings -------------------------------------------------------------------

# 8 slots on 4 GPUs (k = 2) in 2 nodes (GPUs 0, 1 | 2, 3); experts 0 and 1 are hot (8 tokens
# each, 2 replicas of 4 tokens), experts 2..5 carry 1 token each.
FINDING_LAYOUT = Layout(num_replicas=8, num_groups=1, num_nodes=2, num_gpus=4)
FINDING_WEIGHT = np.array([[8.0, 8.0, 1.0, 1.0, 1.0, 1.0]])
HOT_IN_ONE_NODE = Placement([[0, 0, 1, 1, 2, 3, 4, 5]], 6)  # GPU loads [8, 8, 2, 2]
HOT_SPREAD = Placement([[0, 2, 1, 3, 0, 4, 1, 5]], 6)  # GPU loads [5, 5, 5, 5]


def test_finding_uniform_dispatch_is_blind_to_replica_location():
    # Each GPU b receives load_b / G from every GPU, and every column of the cost matrix sums
    # to the same C = (G/N - 1) * 1 + (G - G/N) * 18 = 1 + 36 = 37; so
    # actual = C / G * total = 37 / 4 * 20 = 185 for ANY placement.
    costs = [
        communication_cost(PlacedWindow.checked(p, FINDING_WEIGHT, FINDING_LAYOUT))
        for p in (HOT_IN_ONE_NODE, HOT_SPREAD)
    ]
    assert costs[0] == costs[1] == (185.0, 8.0, 20.0)  # minimum: 8 * 1/2 + 8 * 1/2 = 8
    # exposed: 185 - 0.1 * 20 = 183 and 8 - 2 = 6, so both score 10 * 6 / 183.
    for placement in (HOT_IN_ONE_NODE, HOT_SPREAD):
        score = communication_score(PlacedWindow.checked(placement, FINDING_WEIGHT, FINDING_LAYOUT))
        assert score == pytest.approx(60 / 183, rel=1e-12)
    # ...although the two placements are very different (balancedness 5/8 against 1).
    in_one_node, spread = (PlacedWindow.checked(p, FINDING_WEIGHT, FINDING_LAYOUT)
                           for p in (HOT_IN_ONE_NODE, HOT_SPREAD))
    assert gpu_balancedness(in_one_node) == 5 / 8
    assert gpu_balancedness(spread) == 1.0


def test_finding_actual_is_the_same_when_gpus_are_permuted():
    layout = Layout()
    rng = np.random.default_rng(3)
    placement = random_placement(rng, 4, 256, layout.num_replicas)
    weight = random_weight(rng, "skewed", 4, 256)
    by_gpu = placement.phy2log.reshape(4, layout.num_gpus, layout.slots_per_gpu)
    permuted = Placement(by_gpu[:, rng.permutation(layout.num_gpus)].reshape(4, -1), 256)
    actual, minimum, total = communication_cost(PlacedWindow.checked(placement, weight, layout))
    assert communication_cost(PlacedWindow.checked(permuted, weight, layout)) == pytest.approx(
        (actual, minimum, total), rel=1e-12
    )
    assert actual == pytest.approx(total * (7 + 18 * 24) / 32, rel=1e-12)


def test_finding_v4_weight_copy_rewards_stacking():
    # No expert has more than k = 2 replicas, so minimum = 0 (the one copy fits on the primary's
    # GPU) and the score is 0 / actual = 0 as soon as one copy leaves its primary's GPU.
    stacked = HOT_IN_ONE_NODE  # copies on the primary's GPU: actual 0 -> score 1
    node_local = Placement([[0, 1, 0, 1, 2, 3, 4, 5]], 6)  # copies 1 GPU away: actual 2
    assert weight_copy_cost(stacked, FINDING_LAYOUT) == (0.0, 0.0)
    assert weight_copy_score(stacked, FINDING_LAYOUT) == 1.0
    assert weight_copy_cost(node_local, FINDING_LAYOUT) == (2.0, 0.0)
    assert weight_copy_score(node_local, FINDING_LAYOUT) == 0.0
    assert weight_copy_cost(HOT_SPREAD, FINDING_LAYOUT) == (36.0, 0.0)  # copies across nodes
    assert weight_copy_score(HOT_SPREAD, FINDING_LAYOUT) == 0.0
    # ...yet stacking is the worst for balance: each hot expert sits on one GPU.
    assert gpu_balancedness(PlacedWindow.checked(stacked, FINDING_WEIGHT, FINDING_LAYOUT)) == 5 / 8
    assert gpu_balancedness(PlacedWindow.checked(HOT_SPREAD, FINDING_WEIGHT, FINDING_LAYOUT)) == 1.0
