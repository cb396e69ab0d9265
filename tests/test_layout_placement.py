import numpy as np
import pytest

from tape import Layout, LayoutError, Placement, PlacementError


def test_layout_derived_maps():
    layout = Layout(num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4)
    assert layout.slots_per_gpu == 3
    assert layout.gpus_per_node == 2
    assert layout.slot_gpu.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert layout.gpu_node.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_replicas": 10, "num_gpus": 4, "num_nodes": 2}, "multiple of num_gpus"),
        ({"num_replicas": 12, "num_gpus": 6, "num_nodes": 4}, "multiple of num_nodes"),
        ({"num_replicas": 0}, "positive integer"),
        ({"num_replicas": 2**40}, "num_replicas must be at most 2147483647"),
    ],
)
def test_layout_rejects_impossible_arguments(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        Layout(**kwargs)


def test_layout_checks_experts():
    layout = Layout(num_replicas=8, num_groups=3, num_nodes=1, num_gpus=2)
    with pytest.raises(LayoutError, match="at least the number of experts"):
        layout.check_experts(9)
    with pytest.raises(LayoutError, match="num_groups"):
        layout.check_experts(8)


def test_placement_derives_log2phy_and_logcnt():
    placement = Placement(np.array([[0, 1, 2, 0, 3, 0]]), 4)
    assert placement.logcnt.tolist() == [[3, 1, 1, 1]]
    assert placement.log2phy.tolist() == [[[0, 3, 5], [1, -1, -1], [2, -1, -1], [4, -1, -1]]]
    loads = placement.slot_loads(np.array([[6.0, 1, 2, 3]]))
    assert loads.tolist() == [[2.0, 1.0, 2.0, 2.0, 3.0, 2.0]]
    assert placement.gpu_loads(np.array([[6.0, 1, 2, 3]]), 2).tolist() == [[5.0, 7.0]]


def test_placement_keeps_policy_replica_order():
    log2phy = np.array([[[5, 0, 3], [1, -1, -1], [2, -1, -1], [4, -1, -1]]])
    placement = Placement.from_maps([[0, 1, 2, 0, 3, 0]], log2phy, [[3, 1, 1, 1]])
    assert placement.primary_slots().tolist() == [[5, 1, 2, 4]]


@pytest.mark.parametrize(
    "phy2log, log2phy, logcnt, message",
    [
        ([[0, 1, 1]], None, [[1, 2, 0]], "no replica"),
        ([[0, 1, 7]], None, [[1, 1, 1]], r"expert ids in \[0, 7\]"),
        ([[0, 1, 2]], [[[0], [1], [1]]], [[1, 1, 1]], "phy2log gives to expert"),
        ([[0, 1, 2]], None, [[1, 1, 2]], r"logcnt\[0, 2\] = 2 but phy2log holds 1 replicas"),
        ([[0, 1, float("nan")]], None, [[1, 1, 1]], "NaN"),
        ([0, 1, 2], None, [[1, 1, 1]], "2 dimensions"),
        ([[0, 1, 2]], [[[0, -1], [1, -1], [-1, 2]]], [[1, 1, 1]], "before its -1 padding"),
    ],
)
def test_placement_rejects_bad_maps(phy2log, log2phy, logcnt, message):
    if log2phy is None:
        log2phy = Placement(np.array([[0, 1, 2]]), 3).log2phy
    with pytest.raises(PlacementError, match=message):
        Placement.from_maps(np.array(phy2log, dtype=float), np.array(log2phy), np.array(logcnt))


def test_placement_validate_against_layout():
    layout = Layout(num_replicas=6, num_groups=1, num_nodes=1, num_gpus=2)
    placement = Placement(np.array([[0, 1, 2, 0, 1, 2]]), 3)
    assert placement.validate(layout, num_layers=1) is placement
    with pytest.raises(PlacementError, match="phy2log has 1 layer, expected 2"):
        placement.validate(layout, num_layers=2)
    with pytest.raises(PlacementError, match="phy2log has 4 slots per layer, expected "
                       "num_replicas = 6"):
        Placement(np.array([[0, 1, 2, 0]]), 3).validate(layout)


def test_placement_rejects_a_slot_listed_twice():
    with pytest.raises(PlacementError, match="exactly once"):
        Placement([[0, 0, 1]], 2, log2phy=[[[0, 0], [2, -1]]])
