import csv
import json

import numpy as np
import pytest

from tape import Layout, Placement
from tape.plots import normalize_rows
from tape.presets import cluster_preset, model_preset
from tape.protocol import ProgramScore, score_policy
from tape.report import (
    _file_stems,
    evaluated_gpu_loads,
    pair_series,
    runtime_stats,
    summarize,
    write_comparison,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _score(balance, moved, ib, seconds):
    metrics = {"gpu_balancedness": balance, "moved_experts": moved, "ib_tokens": ib,
               "step_time_s": 0.01}
    return ProgramScore(metrics=metrics, seconds=seconds)


def test_runtime_stats_in_milliseconds():
    stats = runtime_stats([0.001, 0.003])
    assert stats == pytest.approx({"runtime_mean_ms": 2.0, "runtime_std_ms": 2 ** 0.5,
                                   "runtime_min_ms": 1.0, "runtime_max_ms": 3.0})


def test_runtime_stats_of_one_call_have_no_spread():
    assert runtime_stats([0.004]) == pytest.approx({"runtime_mean_ms": 4.0, "runtime_std_ms": 0.0,
                                                    "runtime_min_ms": 4.0, "runtime_max_ms": 4.0})


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
    assert tape["step_time_ratio"] == pytest.approx(1.0)  # 0.01 s for both
    assert summary["deepseek"]["moved_experts_ratio"] == pytest.approx(1.0)


def test_summarize_puts_inter_node_tokens_over_the_fewest_possible():
    score = _score(0.8, 1.0, 30.0, [0.001])
    score.metrics["ib_tokens_bound"] = 24.0
    summary = summarize({"tape": score, "uniform": _score(0.8, 1.0, 30.0, [0.001])})
    assert summary["tape"]["ib_tokens_over_bound"] == pytest.approx(1.25)
    assert "ib_tokens_over_bound" not in summary["uniform"]  # no bound: uniform dispatch


def test_summarize_without_deepseek_has_no_ratios():
    summary = summarize({"tape": _score(0.8, 1.0, 1.0, [0.001])})
    assert "moved_experts_ratio" not in summary["tape"]
    # A baseline that failed gives no ratios either.
    broken = ProgramScore(metrics={"combined_score": 0.0}, error="it broke", seconds=[0.001])
    failed = summarize({"deepseek": broken, "tape": _score(0.8, 1.0, 1.0, [0.001])})
    assert failed["deepseek"]["error"] == "it broke"
    assert not any(key.endswith(("_ratio", "_gain")) for key in failed["tape"])


def test_evaluated_gpu_loads_score_placement_i_on_window_i_plus_one_by_hand():
    # 2 GPUs of 2 slots, 3 experts. Placement 0 ([0 0 | 1 2]) on window 1 (loads 4, 2, 6):
    # GPU0 = 4/2 + 4/2 = 4, GPU1 = 2 + 6 = 8. Placement 1 ([0 1 | 2 2]) on window 2 (8, 0, 2):
    # GPU0 = 8 + 0 = 8, GPU1 = 2/2 + 2/2 = 2. Summed over the pairs: [12, 10]. Window 0 is
    # only ever rebalanced on, so its loads (9, 9, 9) must not show.
    layout = Layout(num_replicas=4, num_groups=1, num_nodes=1, num_gpus=2)
    windows = np.array([[[9.0, 9.0, 9.0]], [[4.0, 2.0, 6.0]], [[8.0, 0.0, 2.0]]])
    placements = [Placement([[0, 0, 1, 2]], 3), Placement([[0, 1, 2, 2]], 3)]
    score = ProgramScore(metrics={}, placements=placements, seconds=[0.001, 0.001])
    np.testing.assert_allclose(evaluated_gpu_loads(score, windows, layout), [[12.0, 10.0]])


def test_normalize_rows_by_hand():
    # Each layer's GPU loads over their sum; an all-zero layer stays zero (no 0 / 0).
    np.testing.assert_allclose(normalize_rows([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]]),
                               [[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]])


def test_file_stems_are_safe_and_distinct():
    stems = _file_stems(["deepseek", "tape:fast", "tape/fast", "tape:preset=all:k=1"])
    assert stems == {"deepseek": "deepseek", "tape:fast": "tape_fast",
                     "tape/fast": "tape_fast_2", "tape:preset=all:k=1": "tape_preset_all_k_1"}


def test_plots_leave_pyplot_and_the_callers_backend_alone(tmp_path):
    import subprocess
    import sys

    code = f"""
import sys
import matplotlib
matplotlib.use("svg")
import numpy as np
from tape.plots import plot_boxplot, plot_comparison, plot_heatmap, plot_timeline
loads = np.arange(12, dtype=float).reshape(3, 4)
out = {str(tmp_path)!r}
paths = [plot_heatmap(loads, out + "/h.png", "h"), plot_boxplot(loads, out + "/b.png", "b"),
         plot_timeline(loads * 1e-6, loads * 2e-6, out + "/t.png", "t"),
         plot_comparison({{"a": {{"gpu_balancedness": [0.5]}}}}, out + "/c.png", "c")]
assert all(open(p, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n" for p in paths)
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_summarize_takes_a_failed_run_without_timings():
    good = ProgramScore({"gpu_balancedness": 0.5, "combined_score": 1.0}, seconds=[0.002])
    failed = ProgramScore.failed("it raised")
    summary = summarize({"deepseek": failed, "mine": good})
    assert summary["deepseek"]["error"] == "it raised"
    assert "runtime_mean_ms" not in summary["deepseek"]
    assert summary["mine"]["runtime_mean_ms"] == pytest.approx(2.0)
    assert "gpu_balancedness_gain" not in summary["mine"]  # no ratios against a failed baseline


def test_a_long_label_gets_a_short_distinct_stem():
    long_a = "tape:migration_weight=0." + "0" * 260 + "1"
    long_b = "tape:migration_weight=0." + "0" * 260 + "2"
    stems = _file_stems([long_a, long_b])
    assert all(len(stem) == 120 for stem in stems.values())
    assert stems[long_a] != stems[long_b]


def test_pair_series_puts_migration_on_the_last_pairs_and_none_where_a_pair_has_no_value():
    # Three pairs; migration (moved_experts) exists from the second pair on; ib_tokens absent.
    score = ProgramScore({}, per_pair={"gpu_balancedness": [0.5, 0.6, 0.7],
                                       "moved_experts": [4.0, 2.0],
                                       "runtime_s": [0.1, 0.2, 0.3]})
    assert pair_series(score, ["gpu_balancedness", "moved_experts", "ib_tokens"]) == {
        "gpu_balancedness": [0.5, 0.6, 0.7],
        "moved_experts": [None, 4.0, 2.0],
        "ib_tokens": [None, None, None],
    }


@pytest.fixture(scope="module")
def comparison_folder(tmp_path_factory):
    """write_comparison on a tiny run: deepseek over 3 window pairs, and a failed policy."""
    layout = Layout(num_replicas=6, num_groups=2, num_nodes=2, num_gpus=2)
    windows = np.random.default_rng(0).pareto(1.5, size=(4, 2, 4)) + 0.1
    model, cluster = model_preset(), cluster_preset()
    # The failed run keeps a per-pair value from before it failed: still no rows for it.
    broken = ProgramScore({"combined_score": 0.0}, per_pair={"gpu_balancedness": [0.9]},
                          error="it raised")
    results = {
        "deepseek": score_policy("deepseek", windows, layout, model=model, cluster=cluster),
        "broken": broken,
    }
    out = tmp_path_factory.mktemp("comparison")
    written = write_comparison(out, results, windows, layout, model=model, cluster=cluster,
                               dispatch="locality", steps_per_window=1,
                               manifest={"command": "compare"})
    return out, results, written


def test_per_window_csv_has_one_row_per_pair_with_per_pairs_values(comparison_folder):
    out, results, _ = comparison_folder
    with open(out / "comparison_per_window.csv", newline="") as file:
        reader = csv.reader(file)
        header = next(reader)
        rows = list(reader)
    assert header == ["policy", "pair", "gpu_balancedness", "moved_experts", "ib_tokens",
                      "step_time_s", "runtime_s"]
    # The failed policy has no rows; deepseek has one per pair, in pair order.
    assert [(row[0], row[1]) for row in rows] == [("deepseek", "0"), ("deepseek", "1"),
                                                  ("deepseek", "2")]
    per_pair = results["deepseek"].per_pair
    for metric in ("gpu_balancedness", "ib_tokens", "step_time_s", "runtime_s"):
        column = header.index(metric)
        assert [float(row[column]) for row in rows] == per_pair[metric]
    # Migration exists from the second pair on: the first pair's cell is empty, not 0.
    moved = [row[header.index("moved_experts")] for row in rows]
    assert len(per_pair["moved_experts"]) == 2
    assert moved[0] == "" and [float(cell) for cell in moved[1:]] == per_pair["moved_experts"]


def test_comparison_png_is_written_and_listed_with_the_csv_in_the_manifest(comparison_folder):
    out, _, written = comparison_folder
    assert (out / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"comparison_per_window.csv", "comparison.png"} <= set(files)
    assert {out / "comparison_per_window.csv", out / "comparison.png"} <= set(written)
    # The failed policy gets no per-policy files; its error is in comparison.json.
    assert not list(out.glob("broken*"))
    assert json.loads((out / "comparison.json").read_text())["broken"]["error"] == "it raised"


@pytest.fixture(scope="module")
def comparison_figures(tmp_path_factory):
    """write_comparison on a tiny run of two policies (2 nodes of 2 GPUs) and a failed one,
    with the figures kept by file name instead of saved."""
    import tape.plots

    layout = Layout(num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4)
    windows = np.random.default_rng(1).pareto(1.5, size=(4, 3, 8)) + 0.1
    model, cluster = model_preset(), cluster_preset()
    results = {name: score_policy(name, windows, layout, model=model, cluster=cluster)
               for name in ("vanilla", "deepseek")}
    results["broken"] = ProgramScore.failed("it raised")
    figures = {}

    def keep(figure, path):
        figures[path.name] = figure
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tape.plots, "_save", keep)
        write_comparison(tmp_path_factory.mktemp("figures"), results, windows, layout,
                         model=model, cluster=cluster, dispatch="locality",
                         steps_per_window=1, manifest={})
    return figures, results, windows, layout


def _node_boundaries(axes):
    return [line.get_xdata()[0] for line in axes.lines if line.get_gid() == "node boundary"]


def test_heatmaps_share_one_colour_scale_centred_on_the_ideal_share(comparison_figures):
    figures, results, windows, layout = comparison_figures
    norms = [figures[f"{name}_gpu_loads_heatmap.png"].axes[0].images[0].norm
             for name in ("vanilla", "deepseek")]
    largest = max(normalize_rows(evaluated_gpu_loads(results[name], windows, layout)).max()
                  for name in ("vanilla", "deepseek"))
    for norm in norms:  # the same scale for both, so that their colours compare
        assert (norm.vmin, norm.vcenter, norm.vmax) == pytest.approx((0.0, 0.25, largest))


def test_heatmap_has_whole_ticks_node_lines_and_a_colour_bar_with_its_unit(comparison_figures):
    figures, _, _, _ = comparison_figures
    axes, colorbar = figures["deepseek_gpu_loads_heatmap.png"].axes[:2]
    figures["deepseek_gpu_loads_heatmap.png"].canvas.draw()
    for ticks in (axes.get_xticks(), axes.get_yticks()):
        shown = [tick for tick in ticks if -0.5 <= tick <= 3.5]
        assert shown and all(float(tick).is_integer() for tick in shown)
    assert _node_boundaries(axes) == [1.5]  # between node 0 and node 1
    assert "ideal 1/G = 0.25" in colorbar.get_ylabel()


def test_box_plots_share_one_y_axis_with_room_for_the_legend(comparison_figures):
    figures, results, windows, layout = comparison_figures
    shares = [normalize_rows(evaluated_gpu_loads(results[name], windows, layout))
              for name in ("vanilla", "deepseek")]
    low = min(share.min() for share in shares)
    high = max(share.max() for share in shares)
    limits = [figures[f"{name}_gpu_loads_boxplot.png"].axes[0].get_ylim()
              for name in ("vanilla", "deepseek")]
    assert limits[0] == limits[1]  # the same axis for both, so that their boxes compare
    bottom, top = limits[0]
    assert bottom < low and top > high + 0.2 * (high - low)  # the legend sits above the boxes
    axes = figures["vanilla_gpu_loads_boxplot.png"].axes[0]
    assert _node_boundaries(axes) == [1.5]


def test_timelines_share_one_y_axis_and_give_the_last_pairs_step_time(comparison_figures):
    figures, results, _, _ = comparison_figures
    limits = [figures[f"{name}_timeline.png"].axes[0].get_ylim()
              for name in ("vanilla", "deepseek")]
    assert limits[0] == limits[1]  # the same axis for both, so that their bars compare
    for name in ("vanilla", "deepseek"):
        score = results[name]
        axes = figures[f"{name}_timeline.png"].axes[0]
        # The timeline is the last pair's: 4 windows, placed on window 2, scored on window 3.
        assert "window 3" in axes.get_title() and "placed on window 2" in axes.get_title()
        # Its step time (the sum of its layer times) is the one comparison_per_window.csv
        # gives for that pair.
        layer_line = axes.lines[0]
        step_ms = score.per_pair["step_time_s"][-1] * 1e3
        assert sum(layer_line.get_ydata()) / 1e3 == pytest.approx(step_ms)
        assert f"step time = {step_ms:.4g} ms" in layer_line.get_label()
        assert all(float(tick).is_integer() for tick in axes.get_xticks())
        assert max(layer_line.get_ydata()) < 0.8 * limits[0][1]  # room for the legend


def test_comparison_writes_counts_plainly_and_wraps_a_long_policy_label(monkeypatch):
    import tape.plots

    figures = []
    monkeypatch.setattr(tape.plots, "_save", lambda figure, path: figures.append(figure))
    long_label = "tape:preset=balance-migration:migration_weight=0.02"
    tape.plots.plot_comparison({
        "deepseek": {"moved_experts": [None, 14400.0], "ib_tokens": [4.2e7, 5.5e7]},
        long_label: {"moved_experts": [None, 633.0], "ib_tokens": [3.7e7, 4.9e7]},
    }, "comparison.png", "policies")
    figure = figures[0]
    figure.canvas.draw()
    moves, tokens = figure.axes[1], figure.axes[2]
    for axes in (moves, tokens):  # 40M, not 4 with "1e7" over the axis
        assert axes.yaxis.get_offset_text().get_text() == ""
    assert any(label.get_text().endswith("M") for label in tokens.get_yticklabels())
    assert "per window" in tokens.get_ylabel()
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["deepseek", "tape:preset=balance-migration:\nmigration_weight=0.02"]


def test_comparison_png_names_the_policies_that_failed(comparison_figures):
    figures, _, _, _ = comparison_figures
    panels = figures["comparison.png"].axes
    assert panels[0].get_title().endswith("(failed, not shown: broken)")
    legend = [text.get_text() for text in panels[0].get_legend().get_texts()]
    assert legend == ["vanilla", "deepseek"]
