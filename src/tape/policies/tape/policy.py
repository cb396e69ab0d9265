"""The `tape` policy's registered function (its parameters and presets: `parameters`).

One call, batched over layers (docs/tape-policy.md tells the whole story):

1. Forecast the next window's loads from the window to balance and the earlier ones
   (`forecast`: a moving average of each window's shares, its smoothing chosen by
   backtesting on the history, down to `smoothing_floor`; with one slot a GPU, the newest
   window).
2. Choose replica counts: EPLB's greedy on the forecast, where a replica that adds a node to a
   hot expert is worth more (`node_spread`, per inter-node token it saves: load / N) and a
   replica that already exists is kept unless
   another is clearly better (`keep_margin`) (`counts`).
3. Place the replicas. Without a previous placement: pack them by DeepSeek's greedy over
   node-interleaved GPUs (`packing`). With one: keep it, free only the slots whose replicas
   go, and give each new replica the freed slot that costs least (`packing`).
4. Improve by swaps between the heaviest and lightest GPUs (`search`), each swap charged its
   weight copies (`migration_weight`, in mean slot loads: the same trade at any slots per
   GPU) and the inter-node tokens it adds (`locality_weight`), for at most `search_rounds`
   rounds of `pairs_per_round` pairs, leaving alone layers within `tolerance` of perfect
   balance and, with a previous placement, adding no copy to a layer past `copy_budget`.
   Then, with a previous placement and two or more slots a GPU, up to `peak_rounds` rounds in
   which each layer's heaviest GPU swaps with its best partner among the ceil(G / 2k)
   lightest GPUs (about G / 2 partner slots), spending the copies the budget leaves unused in
   all layers together, best peak reduction per copy first (`search.relieve_peaks`).
5. Keep every expert that stays on its GPU in its old slot (`packing`). Starting from the
   previous placement keeps its GPU and node labels: nothing needs relabelling.

With `keep_balancedness` below 1, a layer whose placement in force already balances the
forecast to at least `keep_balancedness` (GPU balancedness, mean / max GPU load) and holds no
expert twice on a GPU is not replanned at all; when no layer needs it, the placement in force
itself is the answer (threshold-triggered rebalancing, at almost no cost).

Every expert gets at least one replica, every GPU the same number of slots, and no GPU two
replicas of one expert. Deterministic: no randomness at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tape.layout import Layout
from tape.placement import Placement
from tape.policies import PolicyError, register
from tape.policies.tape.counts import replica_counts
from tape.policies.tape.forecast import MEMORY, forecast_load
from tape.policies.tape.packing import (
    keep_previous_slots,
    packed_placement,
    reassign_replicas,
    repair_duplicates,
    second_replicas,
)
from tape.policies.tape.parameters import settings as parameter_settings
from tape.policies.tape.search import balance_by_swaps, relieve_peaks
from tape.policies.tape.state import SlotState

__all__ = ["tape_policy"]

def _inputs(
    weight: np.ndarray, layout: Layout, history: np.ndarray | None, reads_history: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """`weight` and the history windows the forecast reads (None if it reads none) as float64.
    The loads, the placement in force and the history were checked where they entered
    (`tape.api.place`, by the trace's rule set); what is checked here is the policy's own
    need: no more slots a GPU than experts."""
    weight = np.asarray(weight, dtype=np.float64)
    num_experts = weight.shape[1]
    if layout.slots_per_gpu > num_experts:
        raise PolicyError(
            f"tape keeps an expert's replicas on distinct GPUs, which needs slots per GPU "
            f"({layout.slots_per_gpu}) <= experts ({num_experts})"
        )
    if history is None or not reads_history or len(history) == 0:
        return weight, None
    return weight, np.asarray(history[-(MEMORY - 1):], dtype=np.float64)


def _search(state: SlotState, settings: dict[str, float | int], migration_weight: float) -> None:
    """Steps 4 and 5 of the module doc: rounds of heavy/light pairs, then, with a previous
    placement, rounds that relieve each layer's heaviest GPU."""
    layout = state.layout
    budget = settings["copy_budget"] if settings["copy_budget"] < 1.0 else None
    pairs = min(int(settings["pairs_per_round"]), layout.num_gpus // 2)
    if pairs > 0 and settings["search_rounds"] > 0:
        balance_by_swaps(
            state,
            rounds=int(settings["search_rounds"]),
            pairs=pairs,
            migration_weight=migration_weight,
            locality_weight=settings["locality_weight"],
            tolerance=settings["tolerance"],
            copy_budget=budget,
        )
    if state.held_before is None or settings["peak_rounds"] == 0 or layout.slots_per_gpu < 2:
        return  # with one slot a GPU a swap exchanges two GPUs' loads: it never lowers a peak
    # About G / 2 partner slots, whatever k: the partners' slots are as many as the lighter
    # half of the GPUs would hold at one slot each, and a round costs k * G / 2 swaps a layer.
    partners = min(layout.num_gpus - 1, -(-layout.num_gpus // (2 * layout.slots_per_gpu)))
    relieve_peaks(
        state,
        rounds=int(settings["peak_rounds"]),
        partners=partners,
        migration_weight=migration_weight,
        locality_weight=settings["locality_weight"],
        copy_budget=budget,
    )


def _fresh_plan(load: np.ndarray, layout: Layout, settings: dict[str, float | int]) -> np.ndarray:
    """[L, G, k] plan from scratch for forecast `load`: counts, snake deal, repair, swaps."""
    counts = replica_counts(
        load, layout, node_spread=settings["node_spread"], keep_margin=0.0, previous_counts=None
    )
    state = SlotState.build(load, packed_placement(load, counts, layout), layout)
    if state.duplicates:
        repair_duplicates(state, np.flatnonzero(second_replicas(state.experts).any(axis=(1, 2))))
    _search(state, settings, 0.0)
    return state.experts


def _incremental_plan(
    load: np.ndarray, previous: np.ndarray, layout: Layout, settings: dict[str, float | int]
) -> np.ndarray:
    """[L, G, k] plan that starts from `previous` (module doc, steps 2-5)."""
    # A swap or a refill trades slots, so the balance it buys is in slot loads: a weight copy
    # is charged in mean slot loads (M / k), the same trade whatever the slots per GPU.
    copy_charge = settings["migration_weight"] / layout.slots_per_gpu  # x mean GPU load M
    state = SlotState.build(load, previous.copy(), layout, in_force=True)
    counts = replica_counts(
        load,
        layout,
        node_spread=settings["node_spread"],
        keep_margin=settings["keep_margin"],
        previous_counts=state.counts,
    )
    reassign_replicas(
        state,
        counts,
        migration_weight=copy_charge,
        locality_weight=settings["locality_weight"],
    )
    _search(state, settings, copy_charge)
    return keep_previous_slots(state.experts, previous, state.held_before)


@register("tape")
def tape_policy(
    weight: np.ndarray,
    layout: Layout,
    *,
    previous: Placement | None = None,
    history: np.ndarray | None = None,
    preset: str = "all",
    **params: Any,
) -> Placement:
    """TAPE's placement for the next window (module doc).

    Args:
        weight: [L, E] tokens per expert in the window to balance (the newest window).
        layout: the cluster; needs E <= S and k = S / G <= E.
        previous: the placement in force, or None (then the plan starts from scratch).
        history: [W, L, E] tokens of the earlier windows, oldest first, or None. The forecast
            reads the last 15 (`forecast.MEMORY` - 1), none when `smoothing_floor` is 1 or
            the layout has one slot a GPU (the newest window is its forecast).
        preset: "balance", "balance-migration", "all" or "fast" (`parameters.PRESETS`).
        **params: overrides of the preset's parameters (`parameters.PARAMETERS`).

    Returns:
        The Placement (log2phy in slot order).

    Raises:
        PolicyError: an unknown preset or parameter, a bad parameter value, or k > E.
        TraceError, PlacementError, LayoutError: malformed weight, history or previous.
    """
    settings = parameter_settings(preset, params)
    smoothing_floor = _smoothing_floor(settings["smoothing_floor"], layout)
    weight, history = _inputs(weight, layout, history, reads_history=smoothing_floor < 1.0)
    num_layers, num_experts = weight.shape
    load = forecast_load(weight, history, smoothing_floor)
    shape = (num_layers, layout.num_gpus, layout.slots_per_gpu)
    if previous is None:
        return Placement(_fresh_plan(load, layout, settings).reshape(num_layers, -1), num_experts)
    experts = previous.phy2log.reshape(shape)
    if settings["keep_balancedness"] >= 1.0:
        replan = np.ones(num_layers, dtype=bool)
    else:
        replan = _balancedness_in_force(load, previous, layout) < settings["keep_balancedness"]
    if not replan.all():  # a layer with two replicas of an expert on one GPU is always replanned
        replan |= second_replicas(experts).any(axis=(1, 2))
    if replan.all():
        experts = _incremental_plan(load, experts, layout, settings)
    elif replan.any():
        experts = experts.copy()
        experts[replan] = _incremental_plan(load[replan], experts[replan], layout, settings)
    if np.array_equal(experts.reshape(num_layers, -1), previous.phy2log):
        return previous  # every slot kept: the placement in force is the answer
    return Placement(experts.reshape(num_layers, -1), num_experts)


def _smoothing_floor(smoothing_floor: float, layout: Layout) -> float:
    """The forecast's smoothing floor on `layout`: 1 (the newest window) with one slot a GPU.

    There the plan is the replica counts alone and a GPU's load is one replica's, so the peak is
    the hottest expert's load over its count. A hot expert's window count has little counting
    noise for its size: averaging it with older windows only lags its drift. Averaging pays for
    the cold experts, whose noisy loads add up on GPUs of several slots; with one slot a GPU
    they never set the peak (docs/tape-policy.md, rule 6).
    """
    return 1.0 if layout.slots_per_gpu == 1 else smoothing_floor


def _balancedness_in_force(load: np.ndarray, previous: Placement, layout: Layout) -> np.ndarray:
    """[L] GPU balancedness (mean / max GPU load) of `load` under the placement in force, 1 for
    a layer without load."""
    gpu_loads = previous.gpu_loads(load, layout.num_gpus)
    peak = gpu_loads.max(axis=1)
    return np.divide(gpu_loads.mean(axis=1), peak, out=np.ones_like(peak), where=peak > 0)


def _check_values(params: dict[str, Any]) -> None:
    """The preset and parameters `params` would run with, checked without placing
    (`tape.policies.check_params`); PolicyError for anything invalid."""
    params = dict(params)
    parameter_settings(params.pop("preset", "all"), params)


tape_policy.check_params = _check_values  # type: ignore[attr-defined]
