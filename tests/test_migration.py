"""Weight migration between consecutive placements: copies by kind, bytes and seconds.

Small cases are worked by hand; random pairs are checked against `plain_migration`, a plain loop
over layers and slots that reads the SPEC: a changed slot copies its new expert from its own GPU
if that GPU held the expert before, else from a GPU of its node, else from another node.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FOUR_GPUS, TOY_CLUSTER, TOY_MODEL, random_layout
from hypothesis import given, settings
from hypothesis import strategies as st

from tape import Layout, Placement, PlacementError
from tape.costmodel import migration, migration_metrics
from tape.presets import ClusterSpec, ModelSpec, load_config

# Before: GPU0 {0, 1}, GPU1 {0, 2} (node 0); GPU2 {3, 1}, GPU3 {3, 0} (node 1).
BEFORE = [0, 1, 0, 2, 3, 1, 3, 0]
# After:  GPU0 {0, 2}, GPU1 {1, 2}; GPU2 {3, 2}, GPU3 {0, 3}.
#   slot 1 (GPU0): 1 -> 2, GPU1 of its node held 2: NVLink copy.
#   slot 2 (GPU1): 0 -> 1, GPU0 of its node held 1: NVLink copy.
#   slot 5 (GPU2): 1 -> 2, only GPU1 (node 0) held 2: InfiniBand copy.
#   slot 6 (GPU3): 3 -> 0 and slot 7: 0 -> 3, GPU3 held both: two local copies.
AFTER = [0, 2, 1, 2, 3, 2, 0, 3]


def plain_migration(
    previous: Placement, current: Placement, layout: Layout, model: ModelSpec, cluster: ClusterSpec
) -> dict:
    """The SPEC's migration, one layer and slot at a time."""
    num_layers, num_slots = current.phy2log.shape
    gpu_of = [s // layout.slots_per_gpu for s in range(num_slots)]
    node_of = [gpu_of[s] // layout.gpus_per_node for s in range(num_slots)]
    counts = {"local": 0, "nvlink": 0, "ib": 0}
    nvlink_bytes = np.zeros(layout.num_gpus)
    ib_bytes = np.zeros(layout.num_gpus)
    for layer in range(num_layers):
        for slot in range(num_slots):
            expert = current.phy2log[layer, slot]
            if expert == previous.phy2log[layer, slot]:
                continue
            holders = [s for s in range(num_slots) if previous.phy2log[layer, s] == expert]
            if any(gpu_of[s] == gpu_of[slot] for s in holders):
                counts["local"] += 1
            elif any(node_of[s] == node_of[slot] for s in holders):
                counts["nvlink"] += 1
                nvlink_bytes[gpu_of[slot]] += model.bytes_per_expert
            else:
                counts["ib"] += 1
                ib_bytes[gpu_of[slot]] += model.bytes_per_expert
    seconds = max(
        max(nvlink_bytes[g] / cluster.nvlink_bandwidth, ib_bytes[g] / cluster.ib_bandwidth)
        for g in range(layout.num_gpus)
    )
    return {**counts, "nvlink_bytes": nvlink_bytes.sum(), "ib_bytes": ib_bytes.sum(),
            "seconds": seconds}


def test_each_copy_kind_by_hand():
    before, after = Placement(np.array([BEFORE]), 4), Placement(np.array([AFTER]), 4)
    moves = migration(before, after, FOUR_GPUS, TOY_MODEL, TOY_CLUSTER)
    assert moves.local_copies.tolist() == [[0, 0, 0, 2]]
    assert moves.nvlink_copies.tolist() == [[1, 1, 0, 0]]
    assert moves.ib_copies.tolist() == [[0, 0, 1, 0]]
    assert moves.changed_slots.tolist() == [[1, 1, 1, 2]]
    assert moves.moved_experts.tolist() == [[1, 1, 1, 0]]
    assert moves.nvlink_bytes.tolist() == [[3.0, 3.0, 0.0, 0.0]]
    assert moves.ib_bytes.tolist() == [[0.0, 0.0, 3.0, 0.0]]
    # GPU0 and GPU1 each take 3 bytes over NVLink (3 s); GPU2 3 bytes over IB (6 s).
    assert moves.seconds == 6.0
    values = migration_metrics(before, after, FOUR_GPUS, TOY_MODEL, TOY_CLUSTER)
    assert values == {
        "changed_slots": 5,
        "local_copies": 2,
        "nvlink_copies": 2,
        "ib_copies": 1,
        "moved_experts": 3,
        "migration_nvlink_bytes": 6.0,
        "migration_ib_bytes": 3.0,
        "migration_seconds": 6.0,
    }
    json.dumps(values)


def test_seconds_sum_a_gpus_layers_and_take_the_busiest_gpu():
    # Layer 0 as above; layer 1 moves two experts onto GPU0 over NVLink and none over IB.
    # Before (layer 1): GPU0 {0, 1}, GPU1 {2, 3}; after: GPU0 {2, 3}, GPU1 {2, 3}.
    before = Placement(np.array([BEFORE, [0, 1, 2, 3, 0, 1, 2, 3]]), 4)
    after = Placement(np.array([AFTER, [2, 3, 2, 3, 0, 1, 0, 1]]), 4)
    # Layer 1: slots 0, 1 (GPU0) copy 2, 3 from GPU1 (NVLink, 6 bytes); slots 6, 7 (GPU3) copy
    # 0, 1 from GPU2 (NVLink, 6 bytes). GPU0 receives 3 + 6 = 9 bytes over NVLink: 9 s, more
    # than GPU2's 6 s over IB.
    moves = migration(before, after, FOUR_GPUS, TOY_MODEL, TOY_CLUSTER)
    assert moves.nvlink_copies.tolist() == [[1, 1, 0, 0], [2, 0, 0, 2]]
    assert moves.seconds == 9.0
    slow_nvlink = ClusterSpec("toy", 2, nvlink_bandwidth=0.5, ib_bandwidth=0.5, flops=6.0,
                              memory_bandwidth=30.0)
    assert migration(before, after, FOUR_GPUS, TOY_MODEL, slow_nvlink).seconds == 18.0


def test_an_unchanged_placement_moves_nothing():
    placement = Placement(np.array([BEFORE]), 4)
    values = migration_metrics(placement, placement, FOUR_GPUS, TOY_MODEL, TOY_CLUSTER)
    assert values["changed_slots"] == 0 and values["moved_experts"] == 0
    assert values["migration_seconds"] == 0.0


def test_swapping_two_slots_on_one_gpu_is_free():
    # Slots 0 and 1 (both GPU0) swap experts 0 and 1: two changed slots, two local copies.
    before = Placement(np.array([BEFORE]), 4)
    after = Placement(np.array([[1, 0, 0, 2, 3, 1, 3, 0]]), 4)
    values = migration_metrics(before, after, FOUR_GPUS, TOY_MODEL, TOY_CLUSTER)
    assert (values["changed_slots"], values["local_copies"], values["moved_experts"]) == (2, 2, 0)


def test_deepseek_expert_is_about_44_megabytes_over_infiniband():
    model, cluster = load_config()
    layout = Layout(num_replicas=4, num_groups=1, num_nodes=2, num_gpus=2)
    before = Placement(np.array([[0, 1, 2, 3]]), 4)
    after = Placement(np.array([[2, 1, 0, 3]]), 4)  # experts 0 and 2 trade nodes
    values = migration_metrics(before, after, layout, model, cluster)
    assert values["ib_copies"] == 2
    assert values["migration_ib_bytes"] == 2 * 44_040_192
    # Each GPU receives one expert over its own 50 GB/s NIC: 44.04 MB / 50 GB/s = 0.88 ms.
    assert values["migration_seconds"] == pytest.approx(44_040_192 / 50e9)


def random_pair(seed: int) -> tuple[Layout, Placement, Placement]:
    rng = np.random.default_rng(seed)
    layout, experts, layers = random_layout(rng)

    def placement() -> Placement:
        rows = [
            rng.permutation(np.concatenate(
                [np.arange(experts), rng.integers(0, experts, layout.num_replicas - experts)]
            ))
            for _ in range(layers)
        ]
        return Placement(np.array(rows), experts)

    previous = placement()
    current = placement()
    # Keep some slots as they were, as a rebalance often does.
    keep = rng.random(current.phy2log.shape) < 0.3
    mixed = np.where(keep, previous.phy2log, current.phy2log)
    missing = [e for row in mixed for e in range(experts) if e not in row]
    return layout, previous, current if missing else Placement(mixed, experts)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_migration_matches_the_plain_reading(seed):
    layout, previous, current = random_pair(seed)
    model, cluster = load_config(cluster="h100")
    values = migration_metrics(previous, current, layout, model, cluster)
    plain = plain_migration(previous, current, layout, model, cluster)
    assert values["local_copies"] == plain["local"]
    assert values["nvlink_copies"] == plain["nvlink"]
    assert values["ib_copies"] == plain["ib"]
    assert values["changed_slots"] == int((previous.phy2log != current.phy2log).sum())
    assert values["moved_experts"] == plain["nvlink"] + plain["ib"]
    assert values["migration_nvlink_bytes"] == pytest.approx(plain["nvlink_bytes"])
    assert values["migration_ib_bytes"] == pytest.approx(plain["ib_bytes"])
    assert values["migration_seconds"] == pytest.approx(plain["seconds"])


def test_placements_of_different_shapes_are_rejected():
    layout = Layout(num_replicas=8, num_groups=1, num_nodes=2, num_gpus=4)
    one_layer = Placement(np.array([BEFORE]), 4)
    two_layers = Placement(np.array([BEFORE, BEFORE]), 4)
    with pytest.raises(PlacementError, match="expected the same"):
        migration(one_layer, two_layers, layout, TOY_MODEL, TOY_CLUSTER)
    five_experts = Placement(np.array([[0, 1, 0, 2, 3, 1, 3, 4]]), 5)
    with pytest.raises(PlacementError, match="has 4 experts, the current one 5"):
        migration(one_layer, five_experts, layout, TOY_MODEL, TOY_CLUSTER)
    with pytest.raises(PlacementError, match="num_replicas = 4"):
        migration(one_layer, one_layer, Layout(4, 1, 2, 4), TOY_MODEL, TOY_CLUSTER)
