"""tape's SGLang plugin against SGLang's own code: its plugin loader, `ExpertLocationMetadata.
init_by_eplb` (the call its EPLB manager makes at every rebalance) and
`compute_initial_expert_location_metadata` (`--init-expert-location`). Skipped where SGLang does
not import (docs/serving.md, "Testing against the engines", installs it on a CPU machine).

SGLang reads its settings from a runtime context that a launched server fills in; here the
context's three accessors in `expert_location` answer with the settings a DeepSeek-V3 server on
4 nodes of 8 GPUs with 32 redundant experts has, and the model's expert shape is SGLang's own
`ModelConfigForExpertLocation` (61 layers, 3 of them dense, 256 experts in 8 groups)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
expert_location = pytest.importorskip("sglang.srt.eplb.expert_location")

import sglang.srt.plugins
import torch
from sglang.srt.elastic_ep import elastic_ep
from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
from sglang.srt.eplb import eplb_algorithms
from typer.testing import CliRunner

from tape import Layout, Placement
from tape.api import rebalance_experts
from tape.cli import app
from tape.engines import sglang_plugin
from tape.synthetic import synthetic_trace

LAYERS, DENSE, EXPERTS, SLOTS, GPUS, NODES, GROUPS = 61, 3, 256, 288, 32, 4, 8
ENGINE_OWN = eplb_algorithms.rebalance_experts


@pytest.fixture
def server(monkeypatch):
    """SGLang's runtime context of a DeepSeek-V3 server (module doc); `server.moe` takes other
    settings. The plugin guard and `eplb_algorithms.rebalance_experts` are restored after."""
    monkeypatch.setattr(eplb_algorithms, "rebalance_experts", ENGINE_OWN)
    monkeypatch.setattr(sglang.srt.plugins, "_plugins_loaded", False)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    moe = SimpleNamespace(ep_num_redundant_experts=SLOTS - EXPERTS, eplb_algorithm="auto",
                          ep_dispatch_algorithm="static", moe_a2a_backend="none",
                          ep_join_mode="none", init_expert_location="trivial")
    parallel = SimpleNamespace(ep_size=GPUS, nnodes=NODES, elastic_ep_initial_size=None,
                               max_ep_size=None)
    for module in (expert_location, elastic_ep):
        monkeypatch.setattr(module, "get_exec", lambda: SimpleNamespace(moe=moe))
        monkeypatch.setattr(module, "get_parallel", lambda: parallel)
    monkeypatch.setattr(expert_location, "get_device", lambda: SimpleNamespace(device="cpu"))
    shape = SimpleNamespace(groups=GROUPS)
    monkeypatch.setattr(
        expert_location.ModelConfigForExpertLocation, "from_model_config",
        staticmethod(lambda model_config: expert_location.ModelConfigForExpertLocation(
            num_layers=LAYERS, num_logical_experts=EXPERTS, num_groups=shape.groups)))
    monkeypatch.setattr(ElasticEPStateManager, "_instance", None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)  # EP rank 0, no process group

    def load_plugins(value):
        monkeypatch.setenv("TAPE_EPLB_POLICY", value)
        monkeypatch.setattr(sglang.srt.plugins, "_plugins_loaded", False)
        sglang.srt.plugins.load_plugins()

    return SimpleNamespace(moe=moe, shape=shape, load_plugins=load_plugins)


@pytest.fixture(scope="module")
def logical_count():
    """[20, 61, 256] int64: SGLang's per-step counts, its 3 dense layers all zero."""
    steps = synthetic_trace(num_steps=20, seed=2).astype(np.int64)
    return torch.from_numpy(np.concatenate(
        [np.zeros((20, DENSE, EXPERTS), dtype=np.int64), steps], axis=1))


def tape_places(count, num_groups=GROUPS, num_nodes=NODES):
    """What tape's policy gives SGLang's counts, called directly."""
    return rebalance_experts(count.sum(0).numpy(), SLOTS, num_groups, num_nodes, GPUS,
                             policy="tape")


def test_without_the_variable_the_plugin_leaves_sglang_alone(server, monkeypatch):
    monkeypatch.delenv("TAPE_EPLB_POLICY", raising=False)
    monkeypatch.setattr(sglang.srt.plugins, "_plugins_loaded", False)
    sglang.srt.plugins.load_plugins()
    assert eplb_algorithms.rebalance_experts is ENGINE_OWN


def test_sglang_places_through_tape_at_a_rebalance(server, logical_count, caplog):
    caplog.set_level("INFO")
    server.load_plugins("all")
    assert eplb_algorithms.rebalance_experts is sglang_plugin.rebalance_experts
    assert "tape is in charge of SGLang's expert placement (policy tape, preset all" in caplog.text
    sglang_plugin._state["setting"].rebalancer.reset()
    metadata = expert_location.ExpertLocationMetadata.init_by_eplb(None, logical_count)
    phy2log = metadata.physical_to_logical_map
    assert tuple(phy2log.shape) == (LAYERS, SLOTS) and phy2log.dtype == torch.int64
    np.testing.assert_array_equal(phy2log.numpy(), tape_places(logical_count)[0])
    placement = Placement(phy2log.numpy(), EXPERTS).validate(Layout(SLOTS, GROUPS, NODES, GPUS),
                                                             LAYERS)
    # SGLang pads log2phy to the slot count and counts the valid entries itself
    assert metadata.logical_to_all_physical_map.shape[-1] == SLOTS
    np.testing.assert_array_equal(metadata.logical_to_all_physical_map_num_valid.numpy(),
                                  placement.logcnt)
    assert metadata.logical_to_rank_dispatch_physical_map is not None


def test_the_next_rebalance_remembers_the_placement_and_the_window(server, logical_count):
    server.load_plugins("fast")
    sglang_plugin._state["setting"].rebalancer.reset()
    first = expert_location.ExpertLocationMetadata.init_by_eplb(None, logical_count[:10])
    second = expert_location.ExpertLocationMetadata.init_by_eplb(None, logical_count[10:])
    want = rebalance_experts(logical_count[10:].sum(0).numpy(), SLOTS, GROUPS, NODES, GPUS,
                             policy="tape", preset="fast",
                             previous_phy2log=first.physical_to_logical_map.numpy(),
                             history=logical_count[:10].sum(0).numpy()[None])[0]
    np.testing.assert_array_equal(second.physical_to_logical_map.numpy(), want)


def test_a_model_without_groups(server, logical_count):
    server.shape.groups = None
    server.load_plugins("all")
    sglang_plugin._state["setting"].rebalancer.reset()
    metadata = expert_location.ExpertLocationMetadata.init_by_eplb(None, logical_count)
    np.testing.assert_array_equal(metadata.physical_to_logical_map.numpy(),
                                  tape_places(logical_count, num_groups=1)[0])


def test_elasticity_aware_is_sglangs_own_while_a_rank_is_down(server, logical_count,
                                                               monkeypatch):
    server.load_plugins("all")
    server.load_plugins("all")  # engines load plugins again: SGLang's own stays SGLang's
    assert sglang_plugin._state["engine_own"] is ENGINE_OWN
    sglang_plugin._state["setting"].rebalancer.reset()
    server.moe.eplb_algorithm = "elasticity_aware_hierarchical"
    active = torch.ones(GPUS, dtype=torch.int32)
    active[5] = 0
    monkeypatch.setattr(ElasticEPStateManager, "_instance", SimpleNamespace(active_ranks=active))
    got = expert_location.ExpertLocationMetadata.init_by_eplb(None, logical_count)
    want = ENGINE_OWN(tokens_per_expert=logical_count, num_physical_experts=SLOTS,
                      num_local_physical_experts=SLOTS // GPUS, num_groups=GROUPS,
                      num_nodes=NODES,
                      algorithm=eplb_algorithms.EplbAlgorithm.elasticity_aware_hierarchical)[0]
    np.testing.assert_array_equal(got.physical_to_logical_map.numpy(), want.numpy())
    assert not np.array_equal(want.numpy(), tape_places(logical_count)[0])
    active[5] = 1  # every rank up again: tape places
    got = expert_location.ExpertLocationMetadata.init_by_eplb(None, logical_count)
    np.testing.assert_array_equal(got.physical_to_logical_map.numpy(),
                                  tape_places(logical_count)[0])


def test_sglang_starts_from_the_file_tape_place_writes(server, tmp_path):
    """`tape place --dense-layers 3 --output` on the MoE layers' trace: SGLang's
    `--init-expert-location` reads it, one row per model layer."""
    trace = tmp_path / "trace.npy"
    np.save(trace, synthetic_trace(num_steps=200, seed=4).astype(float))
    path = tmp_path / "placement.json"
    result = CliRunner().invoke(app, ["place", "--trace", str(trace), "--dense-layers",
                                      str(DENSE), "--output", str(path), "--json"])
    assert result.exit_code == 0, result.output
    server.moe.init_expert_location = str(path)
    metadata = expert_location.compute_initial_expert_location_metadata(None, moe_ep_rank=0)
    written = np.array(json.loads(path.read_text())["physical_to_logical_map"])
    assert written.shape == (LAYERS, SLOTS)
    np.testing.assert_array_equal(metadata.physical_to_logical_map.numpy(), written)
    np.testing.assert_array_equal(metadata.physical_to_logical_map.numpy()[:DENSE],
                                  np.tile(np.arange(SLOTS) % EXPERTS, (DENSE, 1)))


def test_a_bad_setting_stops_sglang_with_one_line(server):
    with pytest.raises(SystemExit) as stopped:
        server.load_plugins("tape:keep_margin=oops")
    message = str(stopped.value)
    assert message.startswith("tape: TAPE_EPLB_POLICY='tape:keep_margin=oops'")
    assert "\n" not in message
