"""tape's vLLM plugin against vLLM's own code: its plugin loader, its EPLB policy registry, its
async worker's `run_rebalance_experts` and its map commit. Skipped where vLLM does not import
(docs/serving.md, "Testing against the engines", installs it on a CPU machine)."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
policy_registry = pytest.importorskip("vllm.distributed.eplb.policy")

import torch
import vllm.plugins
from vllm.config.parallel import EPLBConfig
from vllm.distributed.eplb import async_worker, eplb_state

from tape import Layout, Placement, Rebalancer
from tape.api import rebalance_experts
from tape.engines import vllm_plugin
from tape.synthetic import synthetic_trace
from tape.trace import window_loads

ARGS = (288, 8, 4, 32)  # DeepSeek-V3 on 4 nodes of 8 GPUs: num_replicas, groups, nodes, GPUs
LAYERS, EXPERTS = 58, 256
VLLM_LOG2PHY_WIDTH = 1024  # vLLM's MAX_EXPERT_REDUNDANCY + 1


@pytest.fixture(scope="module")
def windows():
    """[4, 58, 256] int64 tensors: 4 windows of 100 synthetic DeepSeek-V3 steps (vLLM counts
    tokens as integers)."""
    trace = synthetic_trace(num_steps=400, seed=1)
    return [torch.from_numpy(w.astype(np.int64)) for w in window_loads(trace, 100)]


@pytest.fixture
def load_plugins(monkeypatch):
    """Load the plugins as vLLM does in each process, with TAPE_EPLB_POLICY set to the given
    value; vLLM's registry and its once-per-process guard are restored afterwards."""
    monkeypatch.setitem(policy_registry.EPLB_POLICIES, "default",
                        policy_registry.EPLB_POLICIES["default"])
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)

    def load(value):
        if value is None:
            monkeypatch.delenv("TAPE_EPLB_POLICY", raising=False)
        else:
            monkeypatch.setenv("TAPE_EPLB_POLICY", value)
        monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
        vllm.plugins.load_general_plugins()
        return policy_registry.EPLB_POLICIES[EPLBConfig().policy]

    return load


def run_rebalance(policy, weight, old_map, num_replicas=ARGS[0], num_groups=ARGS[1],
                  num_nodes=ARGS[2], num_gpus=ARGS[3]):
    """vLLM's async worker's call of its policy, as it makes it."""
    stats = eplb_state.EplbStats(global_expert_load_window=weight, num_replicas=num_replicas,
                                 num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus)
    return async_worker.run_rebalance_experts(
        SimpleNamespace(eplb_stats=stats), SimpleNamespace(policy=policy), old_map, None)


def trivial_map(num_layers=LAYERS, num_experts=EXPERTS, num_slots=ARGS[0]):
    """vLLM's initial map: slot s holds expert s % E."""
    return torch.arange(num_slots).remainder(num_experts).repeat(num_layers, 1)


def test_without_the_variable_the_plugin_leaves_vllm_alone(load_plugins):
    assert load_plugins(None) is policy_registry.DefaultEplbPolicy


def test_async_eplb_is_the_default_and_takes_only_the_name_default():
    """Why the plugin replaces "default" rather than adding a name."""
    assert EPLBConfig().use_async
    with pytest.raises(ValueError):
        EPLBConfig(policy="tape")


def test_vllm_places_through_tape_in_its_async_worker(load_plugins, windows, caplog):
    caplog.set_level("INFO")
    policy = load_plugins("all")
    assert policy is vllm_plugin.policy_class()
    assert "tape is in charge of vLLM's expert placement (policy tape, preset all" in caplog.text
    layout = Layout(*ARGS)
    old = trivial_map()
    first = run_rebalance(policy, windows[0], old)
    assert first.device.type == "cpu" and first.dtype == torch.int64
    assert tuple(first.shape) == (LAYERS, ARGS[0])
    Placement(first.numpy(), EXPERTS).validate(layout, LAYERS)
    want = rebalance_experts(windows[0].numpy(), *ARGS, policy="tape", previous_phy2log=old)[0]
    np.testing.assert_array_equal(first.numpy(), want)
    # the next call: the engine's map in force (positional) and the first window as history
    second = run_rebalance(policy, windows[1], first.clone())
    want = rebalance_experts(windows[1].numpy(), *ARGS, policy="tape",
                             previous_phy2log=first.numpy(), history=windows[0].numpy()[None])[0]
    np.testing.assert_array_equal(second.numpy(), want)


def test_vllm_rebuilds_its_1024_wide_log2phy_from_tapes_phy2log(monkeypatch, load_plugins,
                                                               windows):
    monkeypatch.setattr(eplb_state, "PIN_MEMORY", False)  # no pinned memory without a GPU
    policy = load_plugins("fast")
    phy2log = run_rebalance(policy, windows[0], trivial_map())
    placement = Placement(phy2log.numpy(), EXPERTS)
    width = VLLM_LOG2PHY_WIDTH
    state = SimpleNamespace(
        physical_to_logical_map=torch.zeros(LAYERS, ARGS[0], dtype=torch.int64),
        physical_to_logical_map_buffer=torch.zeros(LAYERS, ARGS[0], dtype=torch.int64),
        logical_to_physical_map=torch.full((LAYERS, EXPERTS, width), -1, dtype=torch.int64),
        logical_replica_count=torch.zeros(LAYERS, EXPERTS, dtype=torch.int64),
    )
    eplb_state._commit_eplb_maps(state, new_physical_to_logical_map=phy2log)
    np.testing.assert_array_equal(state.logical_replica_count.numpy(), placement.logcnt)
    log2phy = state.logical_to_physical_map.numpy()
    narrow = placement.log2phy.shape[2]
    np.testing.assert_array_equal(log2phy[:, :, :narrow], placement.log2phy)
    assert (log2phy[:, :, narrow:] == -1).all()


def test_the_profile_runs_empty_window_is_not_history(load_plugins, windows):
    policy = load_plugins("all")
    rebalancer = policy.setting.rebalancer
    rebalancer.reset()
    old = trivial_map()
    dummy = run_rebalance(policy, torch.zeros_like(windows[0]), old)
    Placement(dummy.numpy(), EXPERTS).validate(Layout(*ARGS), LAYERS)
    assert rebalancer.windows_kept == 0
    got = run_rebalance(policy, windows[0], old)
    want = rebalance_experts(windows[0].numpy(), *ARGS, policy="tape", previous_phy2log=old)[0]
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("new_gpus", [12, 20])
def test_elastic_ep_a_new_slot_count_with_the_old_map(load_plugins, new_gpus):
    """Scaling down, vLLM passes the map of the old, wider slots; scaling up, a map of the new
    width whose new slots hold -1. Neither is a placement of the new slots: tape starts afresh
    and places every new slot."""
    policy = load_plugins("all")
    policy.setting.rebalancer.reset()
    experts, gpus, per_gpu = 64, 16, 6
    weight = torch.from_numpy(np.random.default_rng(new_gpus).integers(0, 1000, (3, experts)))
    old = trivial_map(3, experts, gpus * per_gpu)
    slots = new_gpus * per_gpu
    if slots > old.shape[1]:
        old = torch.cat([old, torch.full((3, slots - old.shape[1]), -1)], dim=1)
    got = run_rebalance(policy, weight, old, slots, 4, 4, new_gpus)
    assert tuple(got.shape) == (3, slots) and got.dtype == torch.int64
    Placement(got.numpy(), experts).validate(Layout(slots, 4, 4, new_gpus), 3)
    np.testing.assert_array_equal(
        got.numpy(), rebalance_experts(weight.numpy(), slots, 4, 4, new_gpus, policy="tape")[0])


def test_vllm_before_0_19_gets_the_three_maps(monkeypatch, load_plugins, windows):
    monkeypatch.setattr(vllm_plugin, "_installed_version", lambda: "0.18.1")
    vllm_plugin.policy_class.cache_clear()
    try:
        policy = load_plugins("fast")
        outputs = policy.rebalance_experts(windows[0], *ARGS, trivial_map())
    finally:
        vllm_plugin.policy_class.cache_clear()
    assert len(outputs) == 3
    assert all(output.dtype == torch.int64 and output.device.type == "cpu" for output in outputs)
    Placement.from_maps(*(output.numpy() for output in outputs))


def test_loading_twice_keeps_one_policy_and_one_memory(load_plugins, windows):
    first = load_plugins("tape:fast")
    rebalancer = first.setting.rebalancer
    assert load_plugins("tape:fast") is first and first.setting.rebalancer is rebalancer
    assert isinstance(rebalancer, Rebalancer) and rebalancer.params == {"preset": "fast"}


def test_a_bad_setting_stops_vllm_with_one_line(load_plugins):
    with pytest.raises(SystemExit) as stopped:
        load_plugins("tape:nonsense")
    message = str(stopped.value)
    assert "TAPE_EPLB_POLICY='tape:nonsense'" in message and "preset" in message
    assert "\n" not in message


@pytest.mark.parametrize("args", [ARGS, (288, 8, 1, 32), (288, 1, 4, 32), (320, 8, 4, 32)])
def test_the_benchmarks_numpy_reading_places_as_vllms_default_policy(windows, args):
    """benchmarks/bench_policies.py times vLLM's default policy through a numpy reading where
    vLLM is not installed: it must place exactly as vLLM's own, with and without a map in
    force (hierarchical and global)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the readings
    try:
        import reference_vllm_default
    finally:
        sys.path.pop(0)
    in_force = None
    for window in windows:
        theirs = policy_registry.DefaultEplbPolicy.rebalance_experts(window, *args, in_force)
        ours = reference_vllm_default.rebalance_experts(
            window.numpy(), *args, None if in_force is None else in_force.numpy())
        np.testing.assert_array_equal(ours, theirs.numpy())
        in_force = theirs
