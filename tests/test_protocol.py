import numpy as np
import pytest

from tape import Layout, Placement, TapeError, TraceError, metrics
from tape.dispatch import fewest_ib_tokens
from tape.placement import PlacedWindow
from tape.protocol import (
    VERSIONS,
    Replay,
    check_windows,
    combined_key,
    parse_version,
    replay,
    score_replay,
)

LAYOUT = Layout(num_replicas=6, num_groups=2, num_nodes=2, num_gpus=2)


def _windows(seed=0, count=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 50, size=(count, 2, 4)).astype(float)


def test_replay_passes_only_earlier_windows_and_the_previous_placement():
    windows = _windows()
    seen = []

    def source(weight, previous, history):
        seen.append((len(seen), weight.copy(), previous, history.copy()))
        return Placement(np.tile([0, 1, 2, 3, 0, 1], (2, 1)), 4), 0.001

    run = replay(source, windows)
    assert len(run.placements) == windows.shape[0] - 1
    for index, weight, previous, history in seen:
        np.testing.assert_array_equal(weight, windows[index])
        np.testing.assert_array_equal(history, windows[:index])
        assert (previous is None) == (index == 0)
    # The last window is only ever scored on, never handed to the policy.
    assert all(not np.array_equal(weight, windows[-1]) for _, weight, _, _ in seen)


def test_score_replay_scores_placement_i_on_window_i_plus_one():
    windows = _windows(1)
    placements = [
        Placement(np.tile([0, 1, 2, 3, 0, 1], (2, 1)), 4),
        Placement(np.tile([3, 2, 1, 0, 3, 2], (2, 1)), 4),
        Placement(np.tile([0, 2, 1, 3, 1, 0], (2, 1)), 4),
    ]
    run = Replay(placements, [0.01, 0.02, 0.03])
    score = score_replay(run, windows, LAYOUT, version=0)
    expected = [metrics.balancedness_score(PlacedWindow.checked(p, windows[i + 1], LAYOUT))
                for i, p in enumerate(placements)]
    assert score.per_pair["balancedness_score"] == pytest.approx(expected)
    assert score.metrics["balancedness_score"] == pytest.approx(np.mean(expected))
    assert score.metrics["avg_raw_time"] == pytest.approx(0.02)
    assert score.metrics["speed_score"] == pytest.approx(0.02 / 0.02)
    assert score.metrics["combined_score"] == pytest.approx(
        (score.metrics["balancedness_score"] + score.metrics["speed_score"]) / 2
    )
    # Migration is counted between consecutive placements only: one value per later pair.
    # Worked by hand (GPU0 = slots 0-2, GPU1 = slots 3-5, one GPU a node), per layer:
    #   [0 1 2 | 3 0 1] -> [3 2 1 | 0 3 2]: slot 0 gets 3 and slot 5 gets 2, which their GPUs
    #   did not hold (2 moves); slots 1-4 take experts their GPU held (local copies).
    #   [3 2 1 | 0 3 2] -> [0 2 1 | 3 1 0]: slot 0 gets 0 and slot 4 gets 1 (2 moves).
    # Two layers: 4 moved experts per rebalance.
    assert score.per_pair["moved_experts"] == [4.0, 4.0]
    assert score.metrics["moved_experts"] == 4.0
    for version in VERSIONS:
        assert combined_key(version) in score.metrics


def test_versions_parse_and_reject():
    assert parse_version("4") == 4
    assert parse_version("Realistic") == "realistic"
    with pytest.raises(TapeError, match="unknown version"):
        parse_version("1")


def test_check_windows_rejects_unusable_traces():
    with pytest.raises(TraceError, match="at least 2 windows"):
        check_windows(np.ones((1, 2, 4)), LAYOUT)
    with pytest.raises(TraceError, match="non-negative"):
        check_windows(-np.ones((3, 2, 4)), LAYOUT)
    with pytest.raises(TapeError, match="at least the number of experts"):
        check_windows(np.ones((3, 2, 8)), LAYOUT)


def test_realistic_score_is_the_fraction_of_ideal_throughput():
    from tape.protocol import _realistic_score

    values = {"balanced_compute_time_s": 1.0, "step_time_s": 2.0, "migration_seconds": 5.0}
    # ideal 10 steps x 1 s = 10 s; actual 10 x 2 s + 5 s migration + 1 s policy = 26 s.
    assert _realistic_score(values, 10, 1.0) == pytest.approx(10 / 26)
    # The first pair has nothing to migrate from.
    del values["migration_seconds"]
    assert _realistic_score(values, 10, 0.0) == pytest.approx(0.5)


def test_timing_repeats_call_the_policy_again_and_keep_the_fastest(monkeypatch):
    import tape.api
    from tape.protocol import policy_source

    durations = iter([0.5, 0.2, 0.3])
    clock = [0.0]
    calls = []
    real_place = tape.api.place

    def place(*args, **kwargs):
        calls.append(kwargs["previous"])
        clock[0] += next(durations)
        return real_place(*args, **kwargs)

    monkeypatch.setattr(tape.api, "place", place)
    monkeypatch.setattr("tape.protocol.time.perf_counter", lambda: clock[0])
    weight = np.arange(1.0, 9.0).reshape(2, 4)
    source = policy_source("deepseek", LAYOUT, timing_repeats=3)
    placement, seconds = source(weight, None, weight[None][:0])
    assert len(calls) == 3 and seconds == pytest.approx(0.2)
    assert placement.phy2log.shape == (2, LAYOUT.num_replicas)


def test_the_fewest_inter_node_tokens_are_scored_under_locality_dispatch_only():
    windows = _windows(3)
    placements = [Placement(np.array([[0, 1, 2, 3, 0, 1]] * 2), 4)] * 3
    run = Replay(placements, [0.001] * 3)
    local = score_replay(run, windows, LAYOUT, dispatch="locality")
    bounds = [fewest_ib_tokens(window, LAYOUT) for window in windows[1:]]
    assert local.per_pair["ib_tokens_bound"] == pytest.approx(bounds)
    assert all(bound <= sent + 1e-9 for bound, sent in
               zip(bounds, local.per_pair["ib_tokens"], strict=True))
    assert "ib_tokens_bound" not in score_replay(run, windows, LAYOUT, dispatch="uniform").metrics
