import pytest

from tape.protocol import ProgramScore
from tape.report import _file_stems, runtime_stats, summarize


def _score(balance, moved, ib, seconds):
    metrics = {"gpu_balancedness": balance, "moved_experts": moved, "ib_tokens": ib,
               "step_time_s": 0.01}
    return ProgramScore(metrics=metrics, seconds=seconds)


def test_runtime_stats_in_milliseconds():
    stats = runtime_stats([0.001, 0.003])
    assert stats == pytest.approx({"runtime_mean_ms": 2.0, "runtime_std_ms": 2 ** 0.5,
                                   "runtime_min_ms": 1.0, "runtime_max_ms": 3.0})


def test_summarize_compares_every_policy_with_deepseek():
    summary = summarize({
        "deepseek": _score(0.75, 1000.0, 40.0, [0.004, 0.004]),
        "tape": _score(0.80, 100.0, 34.0, [0.002, 0.002]),
    })
    tape = summary["tape"]
    assert tape["gpu_balancedness_gain"] == pytest.approx(0.05)
    assert tape["moved_experts_ratio"] == pytest.approx(0.1)
    assert tape["ib_tokens_ratio"] == pytest.approx(0.85)
    assert tape["runtime_ratio"] == pytest.approx(0.5)
    assert summary["deepseek"]["moved_experts_ratio"] == pytest.approx(1.0)


def test_summarize_without_deepseek_has_no_ratios():
    summary = summarize({"tape": _score(0.8, 1.0, 1.0, [0.001])})
    assert "moved_experts_ratio" not in summary["tape"]


def test_file_stems_are_safe_and_distinct():
    stems = _file_stems(["deepseek", "tape:fast", "tape/fast", "tape:preset=all:k=1"])
    assert stems == {"deepseek": "deepseek", "tape:fast": "tape_fast",
                     "tape/fast": "tape_fast_2", "tape:preset=all:k=1": "tape_preset_all_k_1"}
