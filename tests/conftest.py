"""Suite-wide settings and the scaffolding tests share.

Every Hypothesis test draws the same examples on every run.

Tests that give their own `@settings(...)` inherit these unless they override them; no example
database is kept, so a run does not depend on what an earlier run stored.
"""

import os
import textwrap

import numpy as np
import pytest
from hypothesis import settings

from tape.layout import Layout
from tape.policies.tape.packing import node_interleaved
from tape.presets import ClusterSpec, ModelSpec
from tape.trace_cache import CACHE_DIR_ENV

settings.register_profile("tape", derandomize=True, database=None)
settings.load_profile("tape")


@pytest.fixture(autouse=True, scope="session")
def _private_trace_cache(tmp_path_factory):
    """Every test (and every `tape` process a test starts) caches parsed traces in a folder of
    the test session's, never in the user's cache folder."""
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("trace-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture(autouse=True)
def _isolation_warning_given(monkeypatch):
    """Where bwrap cannot run, the first command that runs a program warns once (one line) of
    partial isolation; tests/test_cli_sandbox.py tests that warning. Elsewhere it would land in
    the output of whichever test ran a program first."""
    import tape.isolation

    monkeypatch.setattr(tape.isolation, "_warned", True)


# ---- shared scaffolding ---------------------------------------------------------------------

# 3-byte experts (3 x 1 x 1 x 1 byte); NVLink 1 byte/s, InfiniBand 0.5 byte/s.
TOY_MODEL = ModelSpec(
    name="toy", num_layers=1, num_experts=4, num_groups=1, top_k=1, topk_groups=1,
    hidden_size=1, moe_intermediate_size=1, bytes_per_parameter=1.0,
    dispatch_bytes_per_token=1.0, combine_bytes_per_token=2.0,
)
TOY_CLUSTER = ClusterSpec(
    name="toy", gpus_per_node=2, nvlink_bandwidth=1.0, ib_bandwidth=0.5, flops=6.0,
    memory_bandwidth=30.0,
)
FOUR_GPUS = Layout(num_replicas=8, num_groups=1, num_nodes=2, num_gpus=4)
"""Two nodes of two GPUs, two slots a GPU."""


def gpu_balance(placement, weight, num_gpus):
    """GPU balancedness read plainly: sum over layers of the mean GPU load / of the max (1 for
    no load)."""
    loads = placement.gpu_loads(weight, num_gpus)
    top = loads.max(axis=1).sum()
    return 1.0 if top == 0 else loads.mean(axis=1).sum() / top


SMALL_LAYOUT = ["--replicas", "12", "--groups", "2", "--nodes", "2", "--gpus", "4"]

GOOD_PROGRAM = '''
import numpy as np

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    weight = np.asarray(weight, dtype=float)
    layers, experts = weight.shape
    phy2log = np.zeros((layers, num_replicas), dtype=np.int64)
    for layer in range(layers):
        counts = np.ones(experts)
        for _ in range(num_replicas - experts):
            counts[np.argmax(weight[layer] / counts)] += 1
        phy2log[layer] = np.repeat(np.arange(experts), counts.astype(int))
    width = int(max(np.bincount(row).max() for row in phy2log))
    log2phy = -np.ones((layers, experts, width), dtype=np.int64)
    logcnt = np.zeros((layers, experts), dtype=np.int64)
    for layer in range(layers):
        for slot, expert in enumerate(phy2log[layer]):
            log2phy[layer, expert, logcnt[layer, expert]] = slot
            logcnt[layer, expert] += 1
    return phy2log, log2phy, logcnt
'''


@pytest.fixture()
def small_trace(tmp_path):
    rng = np.random.default_rng(0)
    popularity = rng.pareto(1.5, size=(3, 8)) + 0.1
    steps = rng.poisson(popularity * 20, size=(40, 3, 8)).astype(float)
    path = tmp_path / "trace.npy"
    np.save(path, steps)
    return path


@pytest.fixture()
def good_program(tmp_path):
    path = tmp_path / "good.py"
    path.write_text(textwrap.dedent(GOOD_PROGRAM))
    return path


def random_layout(rng):
    """A random small layout (1 to 3 nodes of 1, 2 or 4 GPUs, up to 12 experts, 1 to 3 layers):
    (layout, experts, layers), every expert with a slot."""
    num_nodes = int(rng.choice([1, 2, 3]))
    num_gpus = num_nodes * int(rng.choice([1, 2, 4]))
    experts = int(rng.integers(2, 13))
    slots_per_gpu = int(rng.integers(1, 5))
    while slots_per_gpu * num_gpus < experts:
        slots_per_gpu += 1
    layout = Layout(slots_per_gpu * num_gpus, 1, num_nodes, num_gpus)
    return layout, experts, int(rng.integers(1, 4))


# ---- a snake-dealt first placement: the tape policy's tests' reference ----------------------

def dealing_orders(layout: Layout, shift: int) -> np.ndarray:
    """[k, G] int64: the order in which each round deals its replicas to GPUs.

    Round 0 follows the node-interleaved GPUs; every later round reverses the round before (a
    "snake": the GPUs that got the lightest replicas get the heaviest next), rotated by `shift`
    places: an expert whose replicas straddle two rounds, with at most `shift` of them in the
    first, then never has two dealt to one GPU (while its replicas are at most about G / 2).
    """
    num_gpus = layout.num_gpus
    orders = np.empty((layout.slots_per_gpu, num_gpus), dtype=np.int64)
    orders[0] = node_interleaved(layout)
    turn = num_gpus - 1 - (np.arange(num_gpus) + shift) % num_gpus
    for round_index in range(1, layout.slots_per_gpu):
        orders[round_index] = orders[round_index - 1][turn]
    return orders


def dealt_placement(load: np.ndarray, counts: np.ndarray, layout: Layout) -> np.ndarray:
    """A first placement: replicas in decreasing load dealt to GPUs in rounds of G, each round
    in about the opposite direction of the one before (`dealing_orders`).

    Args:
        load: [L, E] float64 forecast tokens per expert.
        counts: [L, E] int64 replicas per expert, in [1, G], each layer summing to S.
        layout: the cluster.

    Returns:
        experts: [L, G, k] int64. No GPU holds two replicas of an expert, unless an expert has
        more than about G / 2 replicas (then `repair_duplicates` fixes it).
    """
    num_layers, num_experts = load.shape
    num_gpus, per_gpu = layout.num_gpus, layout.slots_per_gpu
    replica_key = np.repeat(np.arange(num_layers * num_experts), counts.reshape(-1))  # [L * S]
    replica_load = (load / counts).reshape(-1)[replica_key].reshape(num_layers, -1)
    order = np.argsort(-replica_load, axis=1, kind="stable")
    order += np.arange(num_layers)[:, None] * layout.num_replicas
    dealt = (replica_key[order] % num_experts).reshape(num_layers, per_gpu, num_gpus)
    orders = dealing_orders(layout, int(counts.max()) - 1)
    experts = np.empty((num_layers, num_gpus, per_gpu), dtype=np.int64)
    experts[:, orders, np.arange(per_gpu)[:, None]] = dealt
    return experts
