"""The realistic cost model: dispatch traffic, bytes, layer times and metrics; presets.

Small cases are worked by hand (numbers in comments); random placements are checked against
`plain_traffic` / `plain_layer_times`, plain loops over layers, source GPUs, experts and
replicas that read the SPEC's "realistic model" word for word.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FOUR_GPUS, TOY_CLUSTER, TOY_MODEL, random_layout
from hypothesis import given, settings
from hypothesis import strategies as st

from tape import ConfigError, Layout, Placement, PlacementError, TraceError
from tape.costmodel import (
    DISPATCH_POLICIES,
    layer_times,
    link_bytes,
    realistic_metrics,
    traffic,
)
from tape.dispatch import fewest_ib_tokens
from tape.placement import PlacedWindow
from tape.presets import ClusterSpec, ModelSpec, cluster_preset, load_config, model_preset

# A toy model and cluster with easy numbers: dispatch 1 byte a token, combine 2 bytes;
# flops_per_token = 2 * 3 * 1 * 1 = 6 FLOP and 6 FLOP/s, so 1 s a token;
# bytes_per_expert = 3 * 1 * 1 * 1 = 3 bytes at 30 bytes/s, so 0.1 s per active slot;
# NVLink 1 byte/s, InfiniBand 0.5 byte/s.

# Two nodes of two GPUs, two slots a GPU:
#   GPU0 (node 0): experts 0, 1     GPU1 (node 0): experts 0, 2
#   GPU2 (node 1): experts 3, 1     GPU3 (node 1): experts 3, 0
# Replicas: expert 0 x3 (GPU0, GPU1, GPU3), expert 1 x2 (GPU0, GPU2), expert 2 x1 (GPU1),
# expert 3 x2 (GPU2, GPU3). Load 12, 8, 4, 16: every GPU starts with 3, 2, 1, 4 tokens of them.
FOUR_GPU_PLACEMENT = Placement(np.array([[0, 1, 0, 2, 3, 1, 3, 0]]), 4)
FOUR_GPU_LOAD = np.array([[12.0, 8.0, 4.0, 16.0]])
FOUR_GPU_WINDOW = PlacedWindow.checked(FOUR_GPU_PLACEMENT, FOUR_GPU_LOAD, FOUR_GPUS)


def random_placement(rng: np.random.Generator, layers: int, experts: int, slots: int) -> Placement:
    """Every expert once, the other slots random experts, shuffled, per layer."""
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        rows.append(rng.permutation(row))
    return Placement(np.array(rows), experts)


def random_case(seed: int) -> tuple[Layout, Placement, np.ndarray]:
    """A random layout, placement and skewed load (with zeros) from `seed`."""
    rng = np.random.default_rng(seed)
    layout, experts, layers = random_layout(rng)
    placement = random_placement(rng, layers, experts, layout.num_replicas)
    load = rng.gamma(0.5, 100.0, (layers, experts)) * (rng.random((layers, experts)) < 0.8)
    return layout, placement, load


def plain_traffic(placement: Placement, weight: np.ndarray, layout: Layout, dispatch: str) -> dict:
    """The SPEC's dispatch, one source GPU, expert and replica at a time."""
    num_layers, num_slots = placement.phy2log.shape
    num_gpus = layout.num_gpus
    gpu_of = [s // layout.slots_per_gpu for s in range(num_slots)]
    node_of = [g // layout.gpus_per_node for g in range(num_gpus)]
    names = ("local", "nvlink_sent", "nvlink_received", "ib_sent", "ib_received")
    out = {name: np.zeros((num_layers, num_gpus)) for name in names}
    slot_tokens = np.zeros((num_layers, num_slots))
    for layer in range(num_layers):
        for expert in range(placement.num_experts):
            replicas = [s for s in range(num_slots) if placement.phy2log[layer, s] == expert]
            for source in range(num_gpus):
                tokens = weight[layer, expert] / num_gpus
                chosen = replicas
                if dispatch == "locality":
                    own = [s for s in replicas if gpu_of[s] == source]
                    node = [s for s in replicas if node_of[gpu_of[s]] == node_of[source]]
                    chosen = own or node or replicas
                for slot in chosen:
                    part = tokens / len(chosen)
                    target = gpu_of[slot]
                    slot_tokens[layer, slot] += part
                    if target == source:
                        out["local"][layer, source] += part
                    elif node_of[target] == node_of[source]:
                        out["nvlink_sent"][layer, source] += part
                        out["nvlink_received"][layer, target] += part
                    else:
                        out["ib_sent"][layer, source] += part
                        out["ib_received"][layer, target] += part
    per_gpu = slot_tokens.reshape(num_layers, num_gpus, layout.slots_per_gpu)
    out["computed"] = per_gpu.sum(axis=2)
    out["active"] = (per_gpu > 0).sum(axis=2)
    return out


def plain_layer_times(
    plain: dict, model: ModelSpec, cluster: ClusterSpec, steps: float
) -> tuple[np.ndarray, np.ndarray]:
    """(busy [L, G], layer [L]) from a `plain_traffic` result, one GPU at a time."""
    num_layers, num_gpus = plain["computed"].shape
    busy = np.zeros((num_layers, num_gpus))
    for layer in range(num_layers):
        for gpu in range(num_gpus):
            compute = plain["computed"][layer, gpu] / steps * model.flops_per_token / cluster.flops
            weights = plain["active"][layer, gpu] * model.bytes_per_expert
            compute += weights / cluster.memory_bandwidth
            comm = 0.0
            for size in (model.dispatch_bytes_per_token, model.combine_bytes_per_token):
                nvlink = max(plain["nvlink_sent"][layer, gpu], plain["nvlink_received"][layer, gpu])
                ib = max(plain["ib_sent"][layer, gpu], plain["ib_received"][layer, gpu])
                comm += max(
                    nvlink / steps * size / cluster.nvlink_bandwidth,
                    ib / steps * size / cluster.ib_bandwidth,
                )
            busy[layer, gpu] = compute + comm
    return busy, busy.max(axis=1)


# ---------------------------------------------------------------- hand-worked: one node ----


def test_two_gpus_one_node_by_hand():
    # GPU0 holds experts 0, 1; GPU1 holds 2, 0. Load 8, 4, 2: each GPU starts with 4, 2, 1.
    layout = Layout(num_replicas=4, num_groups=1, num_nodes=1, num_gpus=2)
    placement = Placement(np.array([[0, 1, 2, 0]]), 3)
    load = np.array([[8.0, 4.0, 2.0]])
    uniform = traffic(PlacedWindow.checked(placement, load, layout), "uniform")
    # uniform: expert 0 splits 2 + 2 from each GPU; expert 1 (GPU0 only) gets GPU1's 2;
    # expert 2 (GPU1 only) gets GPU0's 1. GPU0 sends 2 + 1, GPU1 sends 2 + 2.
    assert uniform.nvlink_sent_tokens.tolist() == [[3.0, 4.0]]
    assert uniform.nvlink_received_tokens.tolist() == [[4.0, 3.0]]
    assert uniform.local_tokens.tolist() == [[4.0, 3.0]]  # 2 + 2 on GPU0, 2 + 1 on GPU1
    assert uniform.computed_tokens.tolist() == [[8.0, 6.0]]  # 4 + 4, 4 + 2
    locality = traffic(PlacedWindow.checked(placement, load, layout), "locality")
    # locality: both GPUs keep their expert-0 tokens; only experts 1 and 2 move.
    assert locality.nvlink_sent_tokens.tolist() == [[1.0, 2.0]]
    assert locality.nvlink_received_tokens.tolist() == [[2.0, 1.0]]
    assert locality.local_tokens.tolist() == [[6.0, 5.0]]
    assert locality.computed_tokens.tolist() == [[8.0, 6.0]]
    for flows in (uniform, locality):
        assert flows.ib_sent_tokens.sum() == 0 and flows.ib_received_tokens.sum() == 0
        assert flows.active_slots.tolist() == [[2, 2]]


# ------------------------------------------------------- hand-worked: two nodes, 4 GPUs ----


def test_four_gpus_uniform_by_hand():
    flows = traffic(FOUR_GPU_WINDOW, "uniform")
    # Each source sends 1 token to each expert-0 replica, 1 to each expert-1 replica, 1 to
    # GPU1 for expert 2 and 2 to each expert-3 replica. GPU0: NVLink 1 (e0 -> GPU1) + 1 (e2);
    # IB 1 (e0 -> GPU3) + 1 (e1 -> GPU2) + 2 + 2 (e3). GPU2: NVLink 1 (e0 -> GPU3) + 2 (e3);
    # IB 1 + 1 (e0) + 1 (e1 -> GPU0) + 1 (e2).
    assert flows.nvlink_sent_tokens.tolist() == [[2.0, 2.0, 3.0, 3.0]]
    assert flows.ib_sent_tokens.tolist() == [[6.0, 6.0, 4.0, 4.0]]
    # GPU2 receives e1 from GPU3 (NVLink 1) and GPU0, GPU1 (IB 1 + 1); e3 from GPU3 (NVLink 2)
    # and GPU0, GPU1 (IB 2 + 2).
    assert flows.nvlink_received_tokens.tolist() == [[2.0, 2.0, 3.0, 3.0]]
    assert flows.ib_received_tokens.tolist() == [[4.0, 4.0, 6.0, 6.0]]
    assert flows.local_tokens.tolist() == [[2.0, 2.0, 3.0, 3.0]]
    # Uniform dispatch computes the slot loads: 12/3 + 8/2, 12/3 + 4, 8/2 + 16/2, 16/2 + 12/3.
    assert flows.computed_tokens.tolist() == [[8.0, 8.0, 12.0, 12.0]]


def test_four_gpus_locality_by_hand():
    flows = traffic(FOUR_GPU_WINDOW, "locality")
    # e0: GPUs 0, 1, 3 keep their 3; GPU2 sends 3 to GPU3 (its node). e1: GPU1 sends 2 to
    # GPU0, GPU3 sends 2 to GPU2. e2 (GPU1 only): GPU0 sends 1 over NVLink, GPU2 and GPU3
    # send 1 each over IB. e3 (node 1 only): GPU0 and GPU1 send 2 to GPU2 and 2 to GPU3.
    assert flows.local_tokens.tolist() == [[5.0, 4.0, 6.0, 7.0]]
    assert flows.nvlink_sent_tokens.tolist() == [[1.0, 2.0, 3.0, 2.0]]
    assert flows.nvlink_received_tokens.tolist() == [[2.0, 1.0, 2.0, 3.0]]
    assert flows.ib_sent_tokens.tolist() == [[4.0, 4.0, 1.0, 1.0]]
    assert flows.ib_received_tokens.tolist() == [[0.0, 2.0, 4.0, 4.0]]
    # GPU0: 3 (e0) + 2 + 2 (e1); GPU1: 3 (e0) + 1 + 1 + 2 (e2); GPU2: 4 (e1) + 8 (e3);
    # GPU3: 6 (e0) + 8 (e3).
    assert flows.computed_tokens.tolist() == [[7.0, 7.0, 12.0, 14.0]]
    assert flows.active_slots.tolist() == [[2, 2, 2, 2]]


def test_four_gpus_bytes_by_hand():
    flows = traffic(FOUR_GPU_WINDOW, "locality")
    sent = link_bytes(flows, TOY_MODEL)
    # GPU0 dispatches 1 NVLink token (1 byte) and returns 2 results (2 x 2 bytes) = 5 bytes;
    # it receives 2 tokens (2 bytes) and 1 result (2 bytes) = 4 bytes.
    assert sent.nvlink_sent.tolist() == [[5.0, 4.0, 7.0, 8.0]]
    assert sent.nvlink_received.tolist() == [[4.0, 5.0, 8.0, 7.0]]
    # GPU2: IB dispatch 1 token (1 byte) + 4 results (8 bytes); receives 4 tokens (4 bytes)
    # + 1 result (2 bytes). GPU1 receives 2 tokens (2 bytes) + 4 results (8 bytes).
    assert sent.ib_sent.tolist() == [[4.0, 8.0, 9.0, 9.0]]
    assert sent.ib_received.tolist() == [[8.0, 10.0, 6.0, 6.0]]


def test_four_gpus_layer_time_by_hand():
    times = layer_times(
        traffic(FOUR_GPU_WINDOW, "locality"), TOY_MODEL, TOY_CLUSTER
    )
    # Dispatch: GPU0 NVLink max(1, 2) x 1 byte / 1 = 2 s, IB max(4, 0) x 1 / 0.5 = 8 s -> 8 s.
    # Every GPU is IB-bound at 4 tokens: 8 s dispatch, 16 s combine (2 bytes a token).
    np.testing.assert_allclose(times.dispatch, [[8.0, 8.0, 8.0, 8.0]])
    np.testing.assert_allclose(times.combine, [[16.0, 16.0, 16.0, 16.0]])
    # Compute: 7, 7, 12, 14 tokens at 1 s + 2 active slots at 0.1 s.
    np.testing.assert_allclose(times.compute, [[7.2, 7.2, 12.2, 14.2]])
    np.testing.assert_allclose(times.layer, [38.2])
    np.testing.assert_allclose(times.idle, [[7.0, 7.0, 2.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(times.comm, [[24.0, 24.0, 24.0, 24.0]])
    assert times.step_time == pytest.approx(38.2)


def test_four_gpus_metrics_by_hand():
    values = realistic_metrics(FOUR_GPU_WINDOW, TOY_MODEL, TOY_CLUSTER, "locality")
    assert values["gpu_balancedness"] == pytest.approx(10.0 / 12.0)  # loads 8, 8, 12, 12
    assert values["local_tokens"] == 22.0
    assert values["nvlink_tokens"] == 8.0
    assert values["ib_tokens"] == 10.0
    assert values["nvlink_bytes"] == 24.0  # 8 tokens x (1 + 2) bytes
    assert values["ib_bytes"] == 30.0
    assert values["step_time_s"] == pytest.approx(38.2)
    assert values["compute_time_s"] == pytest.approx(14.2)  # GPU3 sets the layer time
    assert values["comm_time_s"] == pytest.approx(24.0)
    # Busy 31.2, 31.2, 36.2, 38.2: mean 34.2 over 38.2.
    assert values["time_balancedness"] == pytest.approx(34.2 / 38.2)
    assert all(isinstance(value, float) for value in values.values())
    json.dumps(values)


def test_layers_add_up_and_start_in_order():
    two_layers = Placement(np.repeat(FOUR_GPU_PLACEMENT.phy2log, 2, axis=0), 4)
    load = np.vstack([FOUR_GPU_LOAD, 2 * FOUR_GPU_LOAD])
    flows = traffic(PlacedWindow.checked(two_layers, load, FOUR_GPUS), "locality")
    times = layer_times(flows, TOY_MODEL, TOY_CLUSTER)
    # Layer 2 doubles every token count: 2 x 38 s of tokens + 0.2 s of weight reads.
    np.testing.assert_allclose(times.layer, [38.2, 76.2])
    np.testing.assert_allclose(times.start, [0.0, 38.2])
    assert times.step_time == pytest.approx(114.4)


def test_steps_divide_tokens_not_weight_reads():
    one = realistic_metrics(FOUR_GPU_WINDOW, TOY_MODEL, TOY_CLUSTER, "locality")
    tenfold = PlacedWindow.checked(FOUR_GPU_PLACEMENT, 10 * FOUR_GPU_LOAD, FOUR_GPUS)
    ten = realistic_metrics(tenfold, TOY_MODEL, TOY_CLUSTER, "locality", steps=10)
    assert ten["step_time_s"] == pytest.approx(one["step_time_s"])
    assert ten["ib_tokens"] == pytest.approx(10 * one["ib_tokens"])  # tokens: window totals
    halved = realistic_metrics(FOUR_GPU_WINDOW, TOY_MODEL, TOY_CLUSTER, "locality", steps=2)
    # Half of 38 s of tokens and transfers, plus GPU3's 0.2 s of weight reads.
    assert halved["step_time_s"] == pytest.approx(38.0 / 2 + 0.2)


# ------------------------------------------------------------ locality vs the seed's view ----


def test_locality_dispatch_depends_on_where_replicas_sit():
    # Same replica counts (every expert twice), two arrangements on 2 nodes x 2 GPUs.
    # Packed: node 0 holds experts 0, 1 on both GPUs, node 1 holds 2, 3.
    packed = Placement(np.array([[0, 1, 0, 1, 2, 3, 2, 3]]), 4)
    # Spread: every node holds all four experts (GPU0: 0, 1; GPU1: 2, 3; GPU2: 0, 1; GPU3: 2, 3).
    spread = Placement(np.array([[0, 1, 2, 3, 0, 1, 2, 3]]), 4)
    load = np.array([[40.0, 30.0, 20.0, 10.0]])
    windows = [PlacedWindow.checked(p, load, FOUR_GPUS) for p in (packed, spread)]
    uniform = [traffic(window, "uniform") for window in windows]
    # Uniform: every source sends each replica the same share wherever it sits, so the totals
    # per link cannot tell the two placements apart (the seed's communication score neither).
    assert uniform[0].ib_sent_tokens.sum() == pytest.approx(uniform[1].ib_sent_tokens.sum())
    assert uniform[0].nvlink_sent_tokens.sum() == pytest.approx(uniform[1].nvlink_sent_tokens.sum())
    packed_flows, spread_flows = (traffic(window, "locality") for window in windows)
    # Locality, packed: node 1's GPUs send all of experts 0, 1 over IB (2 x (10 + 7.5) = 35),
    # node 0's all of experts 2, 3 (2 x (5 + 2.5) = 15). Spread: every node holds every
    # expert, nothing crosses IB; GPUs 0 and 2 send their e2, e3 tokens (5 + 2.5) over NVLink.
    assert packed_flows.ib_sent_tokens.sum() == pytest.approx(50.0)
    assert spread_flows.ib_sent_tokens.sum() == 0.0
    assert spread_flows.nvlink_sent_tokens.tolist() == [[7.5, 17.5, 7.5, 17.5]]


def test_fewest_inter_node_tokens_by_hand():
    # 2 nodes of 1 GPU, 6 slots for 4 experts: the 2 spare slots put experts 0 and 1 (the
    # largest loads) on both nodes; experts 2 and 3 stay on one node each, so the other node's
    # half of their tokens crosses: (2 + 2) / 2 = 2.
    two_nodes = Layout(num_replicas=6, num_groups=1, num_nodes=2, num_gpus=2)
    assert fewest_ib_tokens([[8.0, 4.0, 2.0, 2.0]], two_nodes) == pytest.approx(2.0)
    # No spare slot: every expert on one node, half of all tokens cross.
    assert fewest_ib_tokens([[8.0, 4.0]], Layout(2, 1, 2, 2)) == pytest.approx(6.0)
    # 4 nodes, one expert, 4 slots: it can sit in every node, nothing crosses.
    assert fewest_ib_tokens([[9.0]], Layout(4, 1, 4, 4)) == 0.0


def test_fewest_inter_node_tokens_are_exactly_zero_when_every_expert_fits_every_node():
    # 3 nodes, 2 experts, 6 slots: both experts in every node, nothing need cross. Not all
    # tokens less the saved ones (4e-16 and -4e-16: an IB / fewest ratio of 1e16).
    three_nodes = Layout(num_replicas=6, num_groups=1, num_nodes=3, num_gpus=3)
    assert fewest_ib_tokens([[2.0, 3.0]], three_nodes) == 0.0
    assert fewest_ib_tokens([[1.0, 3.0]], three_nodes) == 0.0
    # More spare slots than nodes to add, and a single node: nothing crosses either.
    assert fewest_ib_tokens([[2.0, 0.0, 3.0]], Layout(12, 1, 3, 3)) == 0.0
    assert fewest_ib_tokens([[2.0, 3.0]], Layout(2, 1, 1, 2)) == 0.0


@pytest.mark.parametrize("load", [[[8.0, 4.0, 2.0, 1.0]], [[5.0, 5.0, 1.0, 0.0]]])
def test_no_placement_sends_fewer_inter_node_tokens_than_the_bound(load):
    """Every placement of 4 experts on 6 slots of 2 nodes x 1 GPU, by brute force: none sends
    fewer tokens across nodes than `fewest_ib_tokens`, and the best sends exactly that."""
    import itertools

    layout = Layout(num_replicas=6, num_groups=1, num_nodes=2, num_gpus=2)
    sent = []
    for slots in itertools.product(range(4), repeat=6):
        if len(set(slots)) < 4 or len(set(slots[:3])) < 3 or len(set(slots[3:])) < 3:
            continue  # an expert without a slot, or two replicas on one GPU
        window = PlacedWindow.checked(Placement(np.array([slots]), 4), load, layout)
        flows = traffic(window, "locality")
        sent.append(flows.ib_sent_tokens.sum())
    assert min(sent) == pytest.approx(fewest_ib_tokens(load, layout))


# ------------------------------------------------------------- random vs the plain reading ----


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), dispatch=st.sampled_from(DISPATCH_POLICIES))
def test_traffic_and_times_match_the_plain_reading(seed, dispatch):
    layout, placement, load = random_case(seed)
    flows = traffic(PlacedWindow.checked(placement, load, layout), dispatch)
    plain = plain_traffic(placement, load, layout, dispatch)
    np.testing.assert_allclose(flows.local_tokens, plain["local"], atol=1e-9)
    np.testing.assert_allclose(flows.nvlink_sent_tokens, plain["nvlink_sent"], atol=1e-9)
    np.testing.assert_allclose(flows.nvlink_received_tokens, plain["nvlink_received"], atol=1e-9)
    np.testing.assert_allclose(flows.ib_sent_tokens, plain["ib_sent"], atol=1e-9)
    np.testing.assert_allclose(flows.ib_received_tokens, plain["ib_received"], atol=1e-9)
    np.testing.assert_allclose(flows.computed_tokens, plain["computed"], atol=1e-9)
    np.testing.assert_array_equal(flows.active_slots, plain["active"])
    steps = float(np.random.default_rng(seed).integers(1, 50))
    model, cluster = model_preset(), cluster_preset("h100")
    times = layer_times(flows, model, cluster, steps)
    busy, layer = plain_layer_times(plain, model, cluster, steps)
    np.testing.assert_allclose(times.busy, busy, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(times.layer, layer, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(times.idle, layer[:, None] - busy, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_tokens_are_conserved_and_locality_never_sends_more_over_ib(seed):
    layout, placement, load = random_case(seed)
    window = PlacedWindow.checked(placement, load, layout)
    uniform, locality = traffic(window, "uniform"), traffic(window, "locality")
    for flows in (uniform, locality):
        total = flows.local_tokens + flows.nvlink_sent_tokens + flows.ib_sent_tokens
        np.testing.assert_allclose(total.sum(axis=1), load.sum(axis=1), rtol=1e-12)
        np.testing.assert_allclose(flows.computed_tokens.sum(axis=1), load.sum(axis=1), rtol=1e-12)
        rounding = 1e-12 * load.sum()  # sums that should be 0 come out as -6e-14
        np.testing.assert_allclose(
            flows.nvlink_sent_tokens.sum(axis=1), flows.nvlink_received_tokens.sum(axis=1),
            atol=rounding,
        )
        np.testing.assert_allclose(
            flows.ib_sent_tokens.sum(axis=1), flows.ib_received_tokens.sum(axis=1),
            atol=rounding,
        )
    # Uniform dispatch computes each GPU's slot loads.
    np.testing.assert_allclose(
        uniform.computed_tokens, placement.gpu_loads(load, layout.num_gpus), atol=1e-9
    )
    # Per source and expert, locality crosses IB only when its node holds no replica, and then
    # uniform sends everything over IB too.
    assert np.all(locality.ib_sent_tokens <= uniform.ib_sent_tokens + 1e-9)
    assert np.all(locality.local_tokens >= uniform.local_tokens - 1e-9)


def test_metrics_add_up_on_a_deepseek_shaped_case():
    rng = np.random.default_rng(7)
    layout = Layout()  # 288 slots, 8 groups, 4 nodes, 32 GPUs
    placement = random_placement(rng, 3, 256, layout.num_replicas)
    load = rng.gamma(0.7, 500.0, (3, 256))
    model, cluster = load_config()
    for dispatch in DISPATCH_POLICIES:
        window = PlacedWindow.checked(placement, load, layout)
        values = realistic_metrics(window, model, cluster, dispatch, steps=100)
        assert values["compute_time_s"] + values["comm_time_s"] == pytest.approx(
            values["step_time_s"]
        )
        assert 0 < values["time_balancedness"] <= 1
        total = values["local_tokens"] + values["nvlink_tokens"] + values["ib_tokens"]
        assert total == pytest.approx(load.sum())
        assert values["ib_bytes"] == pytest.approx(
            values["ib_tokens"] * (model.dispatch_bytes_per_token + model.combine_bytes_per_token)
        )


def test_an_all_zero_load_costs_nothing():
    idle = PlacedWindow.checked(FOUR_GPU_PLACEMENT, np.zeros((1, 4)), FOUR_GPUS)
    values = realistic_metrics(idle, TOY_MODEL, TOY_CLUSTER, "locality")
    assert values["step_time_s"] == 0.0
    assert values["time_balancedness"] == 1.0
    assert values["gpu_balancedness"] == 1.0


# --------------------------------------------------------------------------------- errors ----


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"dispatch": "nearest"}, ConfigError, "expected one of uniform, locality"),
        ({"weight": np.ones((2, 4))}, TraceError, "weight has 2 layers, expected 1"),
        ({"weight": -FOUR_GPU_LOAD}, TraceError, "negative"),
        ({"weight": FOUR_GPU_LOAD * np.nan}, TraceError, "NaN"),
        ({"steps": 0}, TraceError, "steps must be positive"),
        ({"steps": "100"}, TraceError, "steps must be a number"),
        ({"layout": Layout(num_replicas=4, num_groups=1, num_nodes=1, num_gpus=2)},
         PlacementError, "num_replicas = 4"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, message):
    # The load and the layout are checked at the door (PlacedWindow.checked), the dispatch and
    # the steps by the cost model.
    arguments = {"placement": FOUR_GPU_PLACEMENT, "weight": FOUR_GPU_LOAD, "layout": FOUR_GPUS,
                 "dispatch": "locality", "steps": 1, **kwargs}
    with pytest.raises(error, match=message):
        window = PlacedWindow.checked(
            arguments["placement"], arguments["weight"], arguments["layout"]
        )
        realistic_metrics(window, TOY_MODEL, TOY_CLUSTER, arguments["dispatch"],
                          steps=arguments["steps"])


# -------------------------------------------------------------------------------- presets ----


def test_deepseek_v3_preset_sizes():
    model = model_preset("deepseek-v3")
    assert model.bytes_per_expert == 3 * 7168 * 2048 == 44_040_192  # about 44 MB in FP8
    assert model.dispatch_bytes_per_token == 7168 + (7168 // 128) * 4  # FP8 + FP32 scales
    assert model.combine_bytes_per_token == 7168 * 2  # BF16
    assert model.flops_per_token == 2 * 3 * 7168 * 2048
    h800, h100 = cluster_preset("h800"), cluster_preset("h100")
    assert (h800.nvlink_bandwidth, h800.ib_bandwidth) == (160e9, 50e9)
    assert (h100.nvlink_bandwidth, h100.ib_bandwidth) == (300e9, 50e9)


def test_config_file_overrides_and_flags_win_over_its_preset(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "model:\n  dispatch_bytes_per_token: 14336\n"
        "cluster:\n  preset: h100\n  ib_bandwidth: 25.0e+9\n"
    )
    model, cluster = load_config(path)
    assert model.name == "deepseek-v3" and model.dispatch_bytes_per_token == 14336.0
    assert cluster.name == "h100" and cluster.ib_bandwidth == 25e9
    assert cluster.nvlink_bandwidth == 300e9
    _, flagged = load_config(path, cluster="h800")  # --cluster h800 wins; the override stays
    assert flagged.name == "h800" and flagged.ib_bandwidth == 25e9
    assert flagged.nvlink_bandwidth == 160e9
    json_path = tmp_path / "cluster.json"
    json_path.write_text(json.dumps({"cluster": {"flops": 2e15}}))
    assert load_config(json_path)[1].flops == 2e15


@pytest.mark.parametrize(
    ("text", "key"),
    [("cluster:\n  ib_bandwidth: .nan\n", "ib_bandwidth"),
     ("model:\n  hidden_size: .inf\n", "hidden_size"),
     ("cluster:\n  flops: .inf\n", "flops")],
)
def test_nan_or_infinite_config_values_are_refused(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(path)


def test_a_slower_network_from_the_config_slows_an_ib_bound_step(tmp_path):
    path = tmp_path / "slow.yaml"
    path.write_text("cluster:\n  ib_bandwidth: 25.0e+9\n")
    layout = Layout(num_replicas=8, num_groups=1, num_nodes=2, num_gpus=4)
    load = 1e5 * FOUR_GPU_LOAD
    window = PlacedWindow.checked(FOUR_GPU_PLACEMENT, load, layout)
    fast = realistic_metrics(window, *load_config(), "uniform")
    slow = realistic_metrics(window, *load_config(path), "uniform")
    assert slow["step_time_s"] > fast["step_time_s"]
    assert slow["ib_bytes"] == fast["ib_bytes"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("cluster:\n  nvlink_speed: 1\n", "unknown key"),
        ("cluster:\n  preset: a100\n", "unknown cluster preset 'a100'"),
        ("cluster:\n  ib_bandwidth: 25e9\n", "with a dot and a sign"),
        ("cluster:\n  ib_bandwidth: -1.0\n", "must be positive"),
        ("model:\n  hidden_size: 7168.5\n", "must be an integer"),
        ("network: {}\n", "unknown section"),
    ],
)
def test_bad_config_files_are_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_config_file_error_names_the_file_and_section_in_plain_text(tmp_path):
    path = tmp_path / "c3.yaml"
    path.write_text("model:\n  topk: 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(
        f"config file {path}, section model: unknown key(s) topk; known: bytes_per_parameter,"
    )
    path.write_text("cluster: [h800]\n")
    with pytest.raises(ConfigError, match=r"c3.yaml, section cluster: must be a mapping of "
                       r"preset fields, got a list"):
        load_config(path)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("c.yaml", "model:\n  top_k: [1, 2\ncluster: {}\n",
         ("c.yaml is not valid YAML: line 3, column 8: expected ',' or ']', but got ':' (while "
          "parsing a flow sequence that starts at line 2, column 10)")),
        ("t.yaml", "model:\n\ttop_k: 8\n",
         ("t.yaml is not valid YAML: line 2, column 1: found character '\\t' that cannot start "
          "any token (while scanning for the next token)")),
        ("z.yaml", "model: \x01\n",
         ("z.yaml is not valid YAML: unacceptable character #x0001: special characters are not "
          "allowed")),
        ("c.json", '{"model": {"top_k": 8,}}',
         ("c.json is not valid JSON: line 1, column 23: Expecting property name enclosed in "
          "double quotes")),
    ],
)
def test_a_syntax_error_in_a_config_file_is_one_line_naming_the_place(tmp_path, name, text,
                                                                       message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"config file {tmp_path / message}"


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_a_folder_given_as_config_file_is_named_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML/JSON file"):
        load_config(tmp_path)
