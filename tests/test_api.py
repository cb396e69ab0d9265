"""tape.api: the drop-in `rebalance_experts` and `place`: array kinds in and out, every error."""

import numpy as np
import pytest

from tape import LayoutError, Placement, PlacementError, TapeError, TraceError
from tape.api import place, rebalance_experts
from tape.layout import Layout
from tape.policies import PolicyError, policy_names

WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
ARGS = (16, 4, 2, 8)  # num_replicas, num_groups, num_nodes, num_gpus


def test_numpy_in_numpy_out():
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, *ARGS)
    for array in (phy2log, log2phy, logcnt):
        assert isinstance(array, np.ndarray)
        assert array.dtype == np.int64
    assert phy2log.shape == (2, 16)
    assert logcnt.shape == (2, 12)
    assert log2phy.shape == (2, 12, int(logcnt.max()))
    placement = Placement.from_maps(phy2log, log2phy, logcnt)  # the three agree
    assert placement.num_slots == 16


def test_lists_and_integer_loads_are_accepted():
    phy2log, _, _ = rebalance_experts(WEIGHT.tolist(), *ARGS)
    expected, _, _ = rebalance_experts(WEIGHT.astype(float), *ARGS)
    np.testing.assert_array_equal(phy2log, expected)


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    weight = torch.tensor(WEIGHT, dtype=torch.float32)
    phy2log, log2phy, logcnt = rebalance_experts(weight, *ARGS)
    expected = rebalance_experts(WEIGHT, *ARGS)
    for tensor, array in zip((phy2log, log2phy, logcnt), expected):
        assert isinstance(tensor, torch.Tensor)
        assert tensor.dtype == torch.int64
        assert tensor.device == weight.device
        np.testing.assert_array_equal(tensor.numpy(), array)


def test_torch_bfloat16_loads_are_read_as_float32():
    # vLLM and SGLang may hold loads in bfloat16, a dtype numpy lacks (once a raw TypeError).
    torch = pytest.importorskip("torch")
    weight = torch.tensor(WEIGHT, dtype=torch.bfloat16)
    phy2log, _, _ = rebalance_experts(
        weight, *ARGS, policy="tape", history=weight[None].to(torch.float8_e4m3fn)
    )
    expected, _, _ = rebalance_experts(
        weight.float(), *ARGS, policy="tape", history=weight[None].to(torch.float8_e4m3fn).float()
    )
    assert phy2log.dtype == torch.int64
    np.testing.assert_array_equal(phy2log.numpy(), expected.numpy())


@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_through_the_drop_in(policy):
    weight = np.random.default_rng(0).integers(0, 100, (3, 16))
    logcnt = rebalance_experts(weight, 24, 4, 2, 4, policy=policy)[2]
    np.testing.assert_array_equal(logcnt.sum(axis=1), 24)


def test_previous_placement_reaches_the_policy():
    rng = np.random.default_rng(1)
    weight = rng.integers(1, 1000, (4, 64))
    before, _, _ = rebalance_experts(weight, 72, 8, 2, 8)
    drifted = weight * rng.lognormal(0, 0.5, weight.shape)
    fresh, _, _ = rebalance_experts(drifted, 72, 8, 2, 8)
    kept, _, _ = rebalance_experts(
        drifted, 72, 8, 2, 8, policy="min-moves", previous_phy2log=before
    )
    assert (kept != before).sum() < (fresh != before).sum()


def test_policy_parameters_are_passed_on():
    weight = np.arange(16.0)[None, :]
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        rebalance_experts(weight, 24, 4, 2, 4, policy="min-moves", base="nope")
    phy2log, _, logcnt = rebalance_experts(weight, 24, 4, 2, 4, policy="replicate-hot")
    # Worked by hand: GPU g homes experts 4g..4g+3 and copies the 2 hottest it does not home:
    # 15 and 14 on GPUs 0-2; GPU 3 homes both, so it takes 11 and 10.
    np.testing.assert_array_equal(phy2log, [[0, 1, 2, 3, 15, 14, 4, 5, 6, 7, 15, 14,
                                             8, 9, 10, 11, 15, 14, 12, 13, 14, 15, 11, 10]])
    np.testing.assert_array_equal(logcnt[0, 10:], [2, 2, 1, 1, 4, 4])


@pytest.mark.parametrize(
    "weight, args, error, message",
    [
        (WEIGHT[0], ARGS, TraceError, r"shape \[layers, experts\], all non-empty, got \(12,\)"),
        (WEIGHT[None], ARGS, TraceError, r"shape \[layers, experts\], all non-empty, got \(1, 2, 12\)"),
        (np.zeros((0, 12)), ARGS, TraceError, "empty"),
        (np.array([["a"] * 12]), ARGS, TraceError, "numbers"),
        (WEIGHT > 4, ARGS, TraceError, "loads must be numbers, got dtype bool"),
        (np.where(WEIGHT == 4, np.nan, WEIGHT), ARGS, TraceError, "NaN"),
        (np.where(WEIGHT == 4, np.inf, WEIGHT), ARGS, TraceError, "infinite"),
        (np.where(WEIGHT == 4, -1, WEIGHT), ARGS, TraceError, "negative"),
        (WEIGHT, (18, 4, 2, 8), LayoutError, "multiple of num_gpus"),
        (WEIGHT, (8, 4, 2, 4), LayoutError, "at least the number of experts"),
        (WEIGHT, (16, 5, 1, 8), LayoutError, "num_groups"),
        (WEIGHT, (16, 4, 3, 8), LayoutError, "multiple of num_nodes"),
        (WEIGHT, (16, 4, 0, 8), LayoutError, "positive integer"),
        (WEIGHT, (16.5, 4, 2, 8), LayoutError, "positive integer"),
    ],
)
def test_bad_arguments_are_rejected_clearly(weight, args, error, message):
    with pytest.raises(error, match=message):
        rebalance_experts(weight, *args)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(PolicyError, match="known policies: .*deepseek.*vanilla"):
        rebalance_experts(WEIGHT, *ARGS, policy="random")


@pytest.mark.parametrize(
    "policy, message",
    [
        (["deepseek"], r"^policy must be a policy name, got \['deepseek'\]; known"),  # TypeError once
        (None, "^policy must be a policy name, got None; known"),
        ("tape:fast", r"^unknown policy 'tape:fast' \(a policy's parameters are keyword"),
    ],
)
def test_a_policy_that_is_not_a_name_is_named(policy, message):
    with pytest.raises(PolicyError, match=message):
        rebalance_experts(WEIGHT, *ARGS, policy=policy)


@pytest.mark.parametrize("name", ["previous", "layout"])
def test_place_arguments_given_to_the_drop_in_are_named(name):
    # Once a raw TypeError: place() got multiple values for the argument.
    with pytest.raises(PolicyError, match=f"^rebalance_experts has no parameter '{name}'; give"):
        rebalance_experts(WEIGHT, *ARGS, policy="tape", **{name: None})


def test_unknown_parameter_names_the_accepted_ones():
    with pytest.raises(PolicyError, match="'deepseek' has no parameter 'k'; it takes none"):
        rebalance_experts(WEIGHT, *ARGS, k=3)
    with pytest.raises(PolicyError, match="no parameter 'bin'; its parameters are: base, tol"):
        rebalance_experts(WEIGHT, *ARGS, policy="min-moves", bin=10)


@pytest.mark.parametrize("policy", ["tape", "deepseek"])
@pytest.mark.parametrize(
    "previous, message",
    [
        (np.arange(16), r"must have shape \[layers, num_replicas\] = \[2, 16\].*got \[16\]$"),
        # Too few slots: once read as "expert 0 of layer 0 has no replica".
        (np.tile(np.arange(12), (2, 1))[:, :10], r"= \[2, 16\].*got \[2, 10\]$"),
        (np.tile(np.arange(12), (2, 1)), r"= \[2, 16\].*got \[2, 12\]$"),
        (np.zeros((3, 16)), r"= \[2, 16\].*got \[3, 16\]$"),
        ([[0, 1], [2]], "must be a rectangular array"),
        (np.full((2, 16), 12), r"^previous_phy2log holds expert ids in \[12, 12\]"),
        (np.zeros((2, 16)), "^previous_phy2log: expert 1 of layer 0 has no replica"),
    ],
)
def test_a_bad_previous_phy2log_is_named_with_its_expected_shape(policy, previous, message):
    # Checked for every policy, also for deepseek, which ignores it (as the docstring says).
    with pytest.raises(PlacementError, match=message):
        rebalance_experts(WEIGHT, *ARGS, policy=policy, previous_phy2log=previous)


def test_ragged_loads_are_named():
    # Once numpy's own "inhomogeneous shape" ValueError.
    with pytest.raises(TraceError, match=r"^weight: loads must be a rectangular array \[layers, "):
        rebalance_experts([[1] * 12, [1] * 11], *ARGS)
    with pytest.raises(TraceError, match=r"^history: loads must be a rectangular array \[windows, "):
        rebalance_experts(WEIGHT, *ARGS, history=[WEIGHT.tolist(), WEIGHT[:1].tolist()])


def test_previous_placement_and_history_are_checked():
    with pytest.raises(TraceError, match=r"history must have shape \[windows, 2, 12\]"):
        rebalance_experts(WEIGHT, *ARGS, history=np.zeros((3, 2, 11)))
    with pytest.raises(TraceError, match="history: load of expert 0 in layer 0 at window 0 is "
                                         "negative"):
        rebalance_experts(WEIGHT, *ARGS, history=-np.ones((3, 2, 12)))


def test_every_error_is_a_tape_error_and_a_value_error():
    for error in (TraceError, LayoutError, PlacementError, PolicyError):
        assert issubclass(error, TapeError) and issubclass(error, ValueError)


def test_place_returns_a_validated_placement():
    layout = Layout(*ARGS)
    placement = place(WEIGHT, layout)
    assert isinstance(placement, Placement)
    assert placement.num_layers == 2 and placement.num_slots == 16
    with pytest.raises(LayoutError, match="num_groups"):
        place(WEIGHT[:, :10], layout)
