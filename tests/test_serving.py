"""tape.Rebalancer: the stateful `rebalance_experts` a serving engine calls window after window."""

import numpy as np
import pytest

from tape import Layout, LayoutError, PlacementError, Rebalancer, TraceError
from tape.api import rebalance_experts
from tape.policies import PolicyError, policy_names
from tape.protocol import policy_source, replay
from tape.serving import SHAPES_KEPT
from tape.synthetic import synthetic_trace
from tape.trace import window_loads

ARGS = (40, 4, 2, 8)  # num_replicas, num_groups, num_nodes, num_gpus; 32 experts


@pytest.fixture(scope="module")
def windows():
    """[8, 3, 32]: eight 50-step windows of a small synthetic trace."""
    trace = synthetic_trace(num_steps=400, num_layers=3, num_experts=32, num_groups=4, top_k=4,
                            topk_groups=2, seed=3)
    return window_loads(trace, 50)


def test_a_rebalancer_replays_the_protocol_exactly(windows):
    """Called window after window, it makes the placements the protocol's replay makes, where
    every call is handed the placement before and all the earlier windows."""
    layout = Layout(*ARGS)
    expected = replay(policy_source("tape", layout), windows).placements
    rebalance = Rebalancer("tape")
    for window, placement in zip(windows[:-1], expected, strict=True):
        phy2log, _, _ = rebalance(window, *ARGS)
        np.testing.assert_array_equal(phy2log, placement.phy2log)
    assert rebalance.windows_kept == len(windows) - 1


def test_each_call_passes_the_last_placement_and_the_kept_windows(windows):
    rebalance = Rebalancer("tape", history_windows=2, preset="fast")
    outputs = [rebalance(window, *ARGS) for window in windows[:5]]
    assert rebalance.windows_kept == 2  # never more than history_windows
    expected = rebalance_experts(windows[5], *ARGS, policy="tape", preset="fast",
                                 previous_phy2log=outputs[-1][0], history=windows[3:5])
    for got, want in zip(rebalance(windows[5], *ARGS), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_first_call_is_the_policy_without_state(windows):
    expected = rebalance_experts(windows[0], *ARGS, policy="tape")
    for got, want in zip(Rebalancer()(windows[0], *ARGS), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_engines_placement_in_force_wins_over_the_remembered_one(windows):
    rebalance = Rebalancer("min-moves")
    rebalance(windows[0], *ARGS)
    in_force = rebalance_experts(windows[1], *ARGS, policy="vanilla")[0]
    got = rebalance(windows[2], *ARGS, previous_phy2log=in_force)[0]
    want = rebalance_experts(windows[2], *ARGS, policy="min-moves", previous_phy2log=in_force,
                             history=windows[:1])[0]
    np.testing.assert_array_equal(got, want)


def test_a_new_shape_starts_afresh(windows):
    rebalance = Rebalancer("tape")
    rebalance(windows[0], *ARGS)
    rebalance(windows[1], *ARGS)
    two_layers = windows[2][:2]
    got = rebalance(two_layers, *ARGS)[0]  # the engine dropped a layer: nothing to remember
    np.testing.assert_array_equal(got, rebalance_experts(two_layers, *ARGS, policy="tape")[0])
    assert rebalance.windows_kept == 1
    wider = (48, *ARGS[1:])  # more slots: the remembered placement no longer fits
    got = rebalance(two_layers, *wider)[0]
    np.testing.assert_array_equal(got, rebalance_experts(two_layers, *wider, policy="tape")[0])


def test_two_models_through_one_rebalancer_keep_their_own_memory(windows):
    """vLLM calls its one policy for every model it serves (a speculative-decoding drafter with
    MoE layers too): each shape keeps its windows and placement, alternating calls included."""
    rebalance = Rebalancer("tape", preset="fast")
    drafter = windows[:, :1]  # a one-layer model beside the three-layer one
    for window, small in zip(windows[:3], drafter[:3], strict=True):
        last = rebalance(window, *ARGS)[0]
        rebalance(small, *ARGS)
    got = rebalance(windows[3], *ARGS)[0]
    want = rebalance_experts(windows[3], *ARGS, policy="tape", preset="fast",
                             previous_phy2log=last, history=windows[:3])[0]
    np.testing.assert_array_equal(got, want)
    assert rebalance.windows_kept == 4


def test_only_the_shapes_used_last_are_kept(windows):
    rebalance = Rebalancer("min-moves")
    rebalance(windows[0], *ARGS)
    for extra in range(1, SHAPES_KEPT + 1):  # SHAPES_KEPT other slot counts: the first is dropped
        rebalance(windows[0], ARGS[0] + 8 * extra, *ARGS[1:])
    got = rebalance(windows[1], *ARGS)[0]
    np.testing.assert_array_equal(got, rebalance_experts(windows[1], *ARGS,
                                                         policy="min-moves")[0])


def test_reset_forgets_everything(windows):
    rebalance = Rebalancer("tape")
    rebalance(windows[0], *ARGS)
    rebalance.reset()
    assert rebalance.windows_kept == 0
    got = rebalance(windows[1], *ARGS)[0]
    np.testing.assert_array_equal(got, rebalance_experts(windows[1], *ARGS, policy="tape")[0])


def _assert_goes_on_from(rebalance, first, windows):
    """`rebalance` remembers window 0 and its placement `first`, and nothing else: its next call
    is the policy given exactly those."""
    assert rebalance.windows_kept == 1
    got = rebalance(windows[1], *ARGS)[0]
    want = rebalance_experts(windows[1], *ARGS, policy="tape", previous_phy2log=first,
                             history=windows[:1])[0]
    np.testing.assert_array_equal(got, want)


def test_a_failed_call_changes_nothing(windows):
    rebalance = Rebalancer("tape")
    first = rebalance(windows[0], *ARGS)[0]
    bad = windows[1].copy()
    bad[0, 0] = np.nan
    with pytest.raises(TraceError, match="NaN"):
        rebalance(bad, *ARGS)
    with pytest.raises(PlacementError, match="previous_phy2log"):
        rebalance(windows[1], *ARGS, previous_phy2log=first[:, :10])
    _assert_goes_on_from(rebalance, first, windows)


def test_a_failed_call_of_a_new_shape_changes_nothing(windows):
    """A call that would start afresh but raises (say, slots that are not a multiple of the
    GPUs) keeps the earlier windows and the placement."""
    rebalance = Rebalancer("tape")
    first = rebalance(windows[0], *ARGS)[0]
    with pytest.raises(LayoutError, match="multiple of num_gpus"):
        rebalance(windows[1], 41, *ARGS[1:])
    _assert_goes_on_from(rebalance, first, windows)


def test_the_engine_may_write_into_what_it_got(windows):
    """The remembered placement is a copy: an engine that reuses the returned array (or the CPU
    tensor made from it) as a buffer does not change what the next call keeps."""
    rebalance = Rebalancer("min-moves")
    phy2log = rebalance(windows[0], *ARGS)[0]
    first = phy2log.copy()
    phy2log[:] = 0
    got = rebalance(windows[1], *ARGS)[0]
    want = rebalance_experts(windows[1], *ARGS, policy="min-moves", previous_phy2log=first)[0]
    np.testing.assert_array_equal(got, want)


def test_per_step_loads_are_summed_into_the_window(windows):
    """SGLang hands its balancer [steps, L, E] counts and no group count for some models."""
    steps = np.stack([windows[0] // 2, windows[0] - windows[0] // 2]).astype(np.int64)
    got = Rebalancer("deepseek")(steps, 40, None, 2, 8)
    want = rebalance_experts(windows[0], 40, 1, 2, 8, policy="deepseek")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_history_windows_zero_keeps_only_the_placement(windows):
    rebalance = Rebalancer("tape", history_windows=0)
    first = rebalance(windows[0], *ARGS)[0]
    got = rebalance(windows[1], *ARGS)[0]
    assert rebalance.windows_kept == 0
    want = rebalance_experts(windows[1], *ARGS, policy="tape", previous_phy2log=first)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_can_stand_behind_a_rebalancer(policy, windows):
    rebalance = Rebalancer(policy)
    for window in windows[:2]:
        phy2log, _, logcnt = rebalance(window, *ARGS)
    assert phy2log.shape == (3, 40)
    assert (logcnt >= 1).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("no-such-policy",), {}, "unknown policy 'no-such-policy'"),
        (("tape",), {"history_windows": -1}, "history_windows must be a non-negative integer"),
        (("tape",), {"history_windows": 2.5}, "history_windows must be"),
        (("tape",), {"migration_wieght": 0.1}, "migration_wieght"),
        (("tape",), {"preset": "quick"}, "unknown tape preset 'quick'"),
        (("deepseek",), {"preset": "all"}, "no parameter 'preset'"),
    ],
)
def test_bad_settings_are_refused_when_the_rebalancer_is_made(args, kwargs, message):
    with pytest.raises(PolicyError, match=message):
        Rebalancer(*args, **kwargs)


@pytest.mark.parametrize("shape", [(32,), (1, 2, 3, 4)])
def test_weight_of_another_rank_is_refused(shape):
    with pytest.raises(TraceError, match="weight must be"):
        Rebalancer()(np.ones(shape), *ARGS)


def test_text_weights_are_refused():
    with pytest.raises(TraceError, match="must hold numbers"):
        Rebalancer()(np.full((2, 32), "x"), *ARGS)


def test_torch_in_torch_out(windows):
    torch = pytest.importorskip("torch")
    rebalance = Rebalancer("tape")
    rebalance(torch.tensor(windows[0], dtype=torch.float32), *ARGS)
    phy2log, log2phy, logcnt = rebalance(torch.tensor(windows[1], dtype=torch.bfloat16), *ARGS)
    for tensor in (phy2log, log2phy, logcnt):
        assert isinstance(tensor, torch.Tensor)
        assert tensor.dtype == torch.int64
    assert phy2log.shape == (3, 40)
    assert rebalance.windows_kept == 2
    kept = phy2log.clone()
    phy2log.zero_()  # a CPU tensor shares memory with its array: not with the remembered one
    got = rebalance(torch.tensor(windows[2]), *ARGS)[0]
    rounded = torch.tensor(windows[1], dtype=torch.bfloat16).float().numpy()  # as kept
    want = rebalance_experts(windows[2], *ARGS, policy="tape", previous_phy2log=kept.numpy(),
                             history=np.stack([windows[0], rounded]))[0]
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("policy, params, message", [
    ("tape", {"preset": "quick"}, "unknown tape preset 'quick'"),
    ("tape", {"keep_margin": -1}, "keep_margin"),
    ("min-moves", {"base": "nope"}, "unknown policy 'nope'"),
    ("min-moves", {"tolerance": -0.5}, "tolerance must be a number >= 0"),
])
def test_the_constructor_checks_values_without_placing(monkeypatch, policy, params, message):
    import tape.api

    def no_placing(*args, **kwargs):
        raise AssertionError("the constructor placed something")

    monkeypatch.setattr(tape.api, "_place", no_placing)
    with pytest.raises(PolicyError, match=message):
        Rebalancer(policy, **params)
    Rebalancer(policy)  # good settings: made without placing
