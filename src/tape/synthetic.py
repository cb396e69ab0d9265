"""A seeded synthetic expert-load trace in any model's shape (DeepSeek-V3's by default, any model
preset's with `model_trace`), for an offline default and tests.

Calibration: the default model (`CALIBRATED`) is calibrated against what public runs of the
seed's own evaluators measured on the public DeepSeek-V3 trace (abmfy/eplb-openevolve
`expert-load.json`): DeepSeek EPLB's slot balancedness, EPLB's global replica counts' slot
balancedness and DeepSeek EPLB's compute balancedness (the seed's timeline). `SURGES` is the
previous calibration, to one next-window GPU balancedness of DeepSeek EPLB: unpredictable
single-expert surges dominate it. docs/traces.md gives the measured numbers, their sources and
how close each model comes.

The model, step by step (all randomness from `np.random.default_rng(seed)`; sd: standard
deviation; the model's parameters are the fields of a `TraceModel`, the rest are module
constants):

1. Tokens per forward step: a decode step (probability 1 - `prefill_fraction`) carries tens to
   hundreds of tokens, a prefill step thousands; both log-uniform in their range.
2. Popularity: expert e of layer l has log-popularity `persistent + drift + mix`, updated every
   `POPULARITY_UPDATE_STEPS` steps and held in between.
   - persistent: the router's lasting preferences, fixed for the whole trace: a group offset
     (sd `group_skew`) that makes some of the `num_groups` groups hotter than others, plus a
     per-expert term whose sd, drawn per layer from `layer_skew`, makes skew differ between
     layers.
   - drift: a slow Ornstein-Uhlenbeck (OU) process per expert, sd `drift_skew`, correlation
     time `drift_steps` steps.
   - mix: the workload's composition. Each of `num_domains` domains (kinds of prompts: code,
     chat, a language...) has a profile, a standard normal log-popularity shift of every expert
     of every layer. The domains' activities are unit-sd OU processes with correlation time
     `mix_steps` steps (a few windows): a domain's surge heats its experts in every layer,
     then fades. The mix is `mix_skew / sqrt(num_domains)` times the activity-weighted sum of
     the profiles, so its sd per expert is `mix_skew`.
   - swaps: about `swap_rate` times per layer and step a hot expert (one of the
     `swap_from_top` hottest) swaps its log-popularity with a random expert from then on: a
     sudden, lasting shift.
   A prefill step is a few long prompts of one domain, drawn at random: its log-popularity adds
   `burst_skew` times that domain's profile. Prefill steps carry most of a window's tokens, so
   these bursts make the next window's loads partly unpredictable.
   A model without group-limited routing is drawn as one group of all its experts
   (num_groups = topk_groups = 1): the group offset is then the same for every expert of a
   layer, which changes no share, and the routing below is plain top-k over all experts.
3. Routing (group-limited top-k, as DeepSeek-V3): each token picks `topk_groups` distinct groups,
   a set S with probability proportional to the product of the groups' popularities, then makes
   `top_k` picks among the experts of S, each expert with probability popularity / popularity of
   S. `group_limited_shares` gives the exact expected share of each expert under this model.
   Two simplifications keep it vectorized: a token's picks are drawn with replacement (with 128
   candidate experts and 8 picks a repeat is rare), and tokens are not sampled one by one.
4. Counts: each step's `tokens * top_k` picks per layer are spread over the experts as their
   expected shares plus counting noise (Poisson-like, sd sqrt(mean)) and request-mix noise
   (relative sd `step_noise`), clipped to [0, tokens] (a token picks an expert at most once) and
   rounded to integers that sum exactly to `tokens * top_k` (systematic rounding: every count is
   its real value rounded down or up).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb, isfinite
from numbers import Real
from typing import TYPE_CHECKING

import numpy as np

from tape.errors import TraceError, checked_integer

if TYPE_CHECKING:
    from tape.presets import ModelSpec

__all__ = [
    "CALIBRATED",
    "DECODE_TOKENS",
    "POPULARITY_UPDATE_STEPS",
    "PREFILL_TOKENS",
    "SURGES",
    "TRACE_MODELS",
    "TraceModel",
    "group_limited_shares",
    "model_trace",
    "synthetic_trace",
    "trace_model",
]

DECODE_TOKENS = (16, 512)
"""Range of tokens in a decode step (log-uniform)."""
PREFILL_TOKENS = (1024, 16384)
"""Range of tokens in a prefill step (log-uniform)."""
POPULARITY_UPDATE_STEPS = 10
"""Popularity is updated every this many steps (far faster than the mix's correlation time)."""
SAMPLING_BLOCK_STEPS = 50
"""Steps whose counts are sampled together (bounds the working memory)."""


@dataclass(frozen=True)
class TraceModel:
    """The parameters of the synthetic trace's model (module doc); sd: standard deviation."""

    prefill_fraction: float = 0.2
    """Probability that a step is a prefill step."""
    layer_skew: tuple[float, float] = (0.1, 0.3)
    """Range of the per-layer sd of an expert's persistent log-popularity (uniform)."""
    group_skew: float = 0.5
    """Sd of a group's persistent log-popularity offset."""
    drift_skew: float = 0.3
    """Sd of the slow drift of an expert's log-popularity."""
    drift_steps: float = 2000.0
    """Correlation time of the slow drift, in steps."""
    num_domains: int = 32
    """Workload domains, each with its own log-popularity profile over every layer's experts."""
    mix_skew: float = 0.1
    """Sd of the workload mix's shift of an expert's log-popularity."""
    mix_steps: float = 300.0
    """Correlation time of the domains' activities, in steps (three windows of 100 steps)."""
    burst_skew: float = 0.2
    """Weight of its domain's profile in a prefill step's log-popularity."""
    swap_rate: float = 1 / 250
    """Hot-expert swaps per layer and step."""
    swap_from_top: int = 8
    """A swap takes its hot expert from this many hottest experts of the layer."""
    step_noise: float = 0.25
    """Relative sd of an expert's count in one step beyond counting noise (request-mix noise)."""

    def __post_init__(self) -> None:
        """Refuse values the model cannot use: `TraceError` naming the field."""
        checked_integer(self.num_domains, "num_domains", TraceError)
        checked_integer(self.swap_from_top, "swap_from_top", TraceError)
        if not _is_number(self.prefill_fraction) or not 0.0 <= self.prefill_fraction <= 1.0:
            raise TraceError(f"prefill_fraction must be in [0, 1], got {self.prefill_fraction!r}")
        for name in ("group_skew", "drift_skew", "mix_skew", "burst_skew", "swap_rate",
                     "step_noise"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0.0:
                raise TraceError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("drift_steps", "mix_steps"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0.0:
                raise TraceError(f"{name} must be a finite number > 0, got {value!r}")
        skew = self.layer_skew
        if (not isinstance(skew, tuple) or len(skew) != 2 or not all(map(_is_number, skew))
                or not 0.0 <= skew[0] <= skew[1]):
            raise TraceError(f"layer_skew must be a tuple (low, high) with 0 <= low <= high, "
                             f"got {skew!r}")


def _is_number(value: object) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and isfinite(value)


CALIBRATED = TraceModel()
"""The default: calibrated against the public trace's measured balancedness (module doc)."""
SURGES = TraceModel(
    layer_skew=(0.45, 0.75), group_skew=0.25, mix_skew=0.5, burst_skew=0.65, swap_rate=1 / 150
)
"""The previous calibration: sharper, less predictable single-expert surges (module doc)."""
TRACE_MODELS = {"calibrated": CALIBRATED, "surges": SURGES}
"""The named models (the CLI's --synthetic-model, the evaluator's TAPE_SYNTHETIC_MODEL)."""


def trace_model(name: str) -> TraceModel:
    """The model named `name` in TRACE_MODELS; TraceError naming the known ones otherwise."""
    if name not in TRACE_MODELS:
        raise TraceError(f"unknown synthetic model {name!r}; known: {', '.join(TRACE_MODELS)}")
    return TRACE_MODELS[name]

MAX_GROUP_SETS = 5000
"""Largest number of group sets C(num_groups, topk_groups) the routing model enumerates."""


def _group_sets(num_groups: int, topk_groups: int) -> np.ndarray:
    """[C, num_groups] float64: 1 where group j belongs to set c, for the C possible sets."""
    count = comb(num_groups, topk_groups)
    if count > MAX_GROUP_SETS:
        raise TraceError(
            f"choosing {topk_groups} of {num_groups} groups gives {count} group sets; the "
            f"synthetic routing model enumerates at most {MAX_GROUP_SETS}"
        )
    members = np.zeros((count, num_groups))
    for index, chosen in enumerate(combinations(range(num_groups), topk_groups)):
        members[index, list(chosen)] = 1.0
    return members


def group_limited_shares(popularity: np.ndarray, num_groups: int, topk_groups: int) -> np.ndarray:
    """Expected share of each expert in a token's picks under group-limited routing.

    A token picks a set S of `topk_groups` distinct groups with probability proportional to the
    product of their popularities (a group's popularity is the sum of its experts'), then each
    of its picks takes expert e of S with probability popularity[e] / popularity(S). So
    `share[e] = popularity[e] * sum over sets S holding e's group of P(S) / popularity(S)`.

    Args:
        popularity: [..., E] positive float, any leading dimensions (for example [steps, L]).
        num_groups: groups of consecutive expert ids; divides E.
        topk_groups: groups each token may use (`topk_groups == num_groups`: no limit).

    Returns:
        [..., E] float64 shares, summing to 1 over the last axis.
    """
    popularity = np.asarray(popularity, dtype=np.float64)
    num_experts = popularity.shape[-1]
    if num_experts % num_groups or not 1 <= topk_groups <= num_groups:
        raise TraceError(
            f"need num_groups dividing {num_experts} experts and 1 <= topk_groups <= "
            f"num_groups, got num_groups={num_groups}, topk_groups={topk_groups}"
        )
    if not np.all(popularity > 0):
        raise TraceError("expert popularities must be positive")
    members = _group_sets(num_groups, topk_groups)
    group_size = num_experts // num_groups
    group_popularity = popularity.reshape(*popularity.shape[:-1], num_groups, group_size)
    group_popularity = group_popularity.sum(axis=-1)
    log_set_weight = np.log(group_popularity) @ members.T
    set_probability = np.exp(log_set_weight - log_set_weight.max(axis=-1, keepdims=True))
    set_probability /= set_probability.sum(axis=-1, keepdims=True)
    set_popularity = group_popularity @ members.T
    per_group = (set_probability / set_popularity) @ members
    return popularity * np.repeat(per_group, group_size, axis=-1)


def _tokens_per_step(
    num_steps: int, prefill_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens in each forward step, [steps] int64, and which steps are prefill, [steps] bool."""
    prefill = rng.random(num_steps) < prefill_fraction
    low = np.where(prefill, PREFILL_TOKENS[0], DECODE_TOKENS[0])
    high = np.where(prefill, PREFILL_TOKENS[1], DECODE_TOKENS[1])
    log_tokens = np.log(low) + rng.random(num_steps) * (np.log(high) - np.log(low))
    return np.round(np.exp(log_tokens)).astype(np.int64), prefill


def _ornstein_uhlenbeck(
    num_updates: int, shape: tuple[int, ...], correlation_steps: float, rng: np.random.Generator
) -> np.ndarray:
    """[updates, *shape] float64: stationary OU processes of sd 1, one per element of `shape`.

    Sampled every `POPULARITY_UPDATE_STEPS` steps, so consecutive updates correlate by
    exp(-POPULARITY_UPDATE_STEPS / correlation_steps).
    """
    keep = np.exp(-POPULARITY_UPDATE_STEPS / correlation_steps)
    innovations = rng.standard_normal((num_updates, *shape))
    innovations[1:] *= np.sqrt(1.0 - keep**2)
    from scipy.signal import lfilter  # here: importing scipy.signal takes most of a second

    return lfilter([1.0], [1.0, -keep], innovations, axis=0)


def _log_popularity(
    num_updates: int,
    profiles: np.ndarray,
    num_groups: int,
    model: TraceModel,
    rng: np.random.Generator,
) -> np.ndarray:
    """[updates, L, E] float64: log-popularity of every expert at each popularity update.

    Args:
        num_updates: popularity updates, `POPULARITY_UPDATE_STEPS` steps apart.
        profiles: [domains, L, E] float64, each domain's log-popularity shift.
        num_groups: expert groups of consecutive ids; divides E.
        model: the model's parameters.
        rng: the trace's generator.

    Returns:
        persistent + drift + mix, with hot-expert swaps (the module doc gives the model).
    """
    num_domains, num_layers, num_experts = profiles.shape
    layer_skew = rng.uniform(*model.layer_skew, size=(num_layers, 1))
    group_offset = rng.normal(0.0, model.group_skew, size=(num_layers, num_groups))
    persistent = rng.standard_normal((num_layers, num_experts)) * layer_skew
    persistent += np.repeat(group_offset, num_experts // num_groups, axis=1)
    drift = _ornstein_uhlenbeck(num_updates, (num_layers, num_experts), model.drift_steps, rng)
    activity = _ornstein_uhlenbeck(num_updates, (num_domains,), model.mix_steps, rng)
    activity *= model.mix_skew / np.sqrt(num_domains)
    mix = activity @ profiles.reshape(num_domains, num_layers * num_experts)
    log_popularity = mix.reshape(num_updates, num_layers, num_experts)
    drift *= model.drift_skew
    log_popularity += drift
    log_popularity += persistent

    num_swaps = rng.poisson(model.swap_rate * POPULARITY_UPDATE_STEPS * num_updates * num_layers)
    swap_updates = rng.integers(0, num_updates, size=num_swaps)
    swap_layers = rng.integers(0, num_layers, size=num_swaps)
    swap_ranks = rng.integers(0, min(model.swap_from_top, num_experts), size=num_swaps)
    swap_partners = rng.integers(0, num_experts, size=num_swaps)
    for index in np.argsort(swap_updates, kind="stable"):
        update, layer = swap_updates[index], swap_layers[index]
        hottest = np.argsort(-log_popularity[update, layer], kind="stable")
        pair = [hottest[swap_ranks[index]], swap_partners[index]]
        log_popularity[update:, layer, pair] = log_popularity[update:, layer, pair[::-1]]
    return log_popularity


def _sample_counts(
    shares: np.ndarray,
    tokens: np.ndarray,
    top_k: int,
    step_noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """[B, L, E] float64 whole counts for B steps, from expected shares [B, L, E] (module doc),
    with request-mix noise of relative sd `step_noise`.

    Each row sums to `tokens * top_k` and each count lies in [0, tokens].
    """
    picks = (tokens * top_k).astype(np.float64)[:, None]
    cap = tokens.astype(np.float64)[:, None, None]
    counts = shares * picks[..., None]
    noise_sd = counts * step_noise
    noise_sd *= noise_sd
    noise_sd += counts
    np.sqrt(noise_sd, out=noise_sd)
    noise_sd *= rng.standard_normal(counts.shape, dtype=np.float32)
    counts += noise_sd
    np.clip(counts, 0.0, cap, out=counts)

    # Rows short of their picks grow in proportion to their room below the cap; rows over
    # them shrink in proportion; both keep every value in [0, cap].
    room = np.subtract(cap, counts, out=noise_sd)
    short = picks - counts.sum(axis=-1)
    room_sum = room.sum(axis=-1)
    room *= (np.maximum(short, 0.0) / np.maximum(room_sum, 1e-300))[..., None]
    counts += room
    counts *= (picks / np.maximum(counts.sum(axis=-1), 1e-300))[..., None]

    # Systematic rounding: with one uniform offset u per row, count[e] = floor(run[e] + u) -
    # floor(run[e - 1] + u), where run is the running sum (its last value is exactly picks).
    running = np.cumsum(counts, axis=-1, out=counts)
    np.minimum(running, picks[..., None], out=running)
    running[..., -1] = picks
    running += rng.random(picks.shape)[..., None]
    np.floor(running, out=running)
    running[..., 1:] -= running[..., :-1].copy()
    return running


def synthetic_trace(
    num_steps: int = 1200,
    num_layers: int = 58,
    num_experts: int = 256,
    num_groups: int = 8,
    top_k: int = 8,
    topk_groups: int = 4,
    seed: int = 0,
    model: TraceModel = CALIBRATED,
) -> np.ndarray:
    """A synthetic expert-load trace: token counts per step, layer and expert (model: module doc).

    Args:
        num_steps: forward steps.
        num_layers: L, MoE layers (DeepSeek-V3: 58).
        num_experts: E, logical experts per layer (DeepSeek-V3: 256).
        num_groups: expert groups of consecutive ids (DeepSeek-V3: 8); divides E.
        top_k: experts each token picks (DeepSeek-V3: 8).
        topk_groups: groups each token may pick from (DeepSeek-V3: 4).
        seed: seed of `np.random.default_rng`, a non-negative integer; the same arguments
            give the same trace.
        model: the model's parameters: `CALIBRATED` (the default) or `SURGES` (module doc),
            or any `TraceModel`.

    Returns:
        [steps, L, E] float64 whole token counts. In every step, each layer's counts sum to
        `tokens * top_k` (the same tokens for every layer) and no count exceeds `tokens`.

    Raises:
        TraceError: an argument that is not a positive integer (the seed: non-negative), or
            group sizes that do not fit (num_groups must divide E, topk_groups <= num_groups,
            top_k <= the experts of topk_groups groups).
    """
    num_steps = checked_integer(num_steps, "num_steps", TraceError)
    num_layers = checked_integer(num_layers, "num_layers", TraceError)
    num_experts = checked_integer(num_experts, "num_experts", TraceError)
    num_groups = checked_integer(num_groups, "num_groups", TraceError)
    top_k = checked_integer(top_k, "top_k", TraceError)
    topk_groups = checked_integer(topk_groups, "topk_groups", TraceError)
    checked_integer(seed, "seed", TraceError, minimum=0)
    if not isinstance(model, TraceModel):
        raise TraceError(f"model must be a TraceModel, got {type(model).__name__}")
    if num_experts % num_groups:
        raise TraceError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    if topk_groups > num_groups:
        raise TraceError(f"topk_groups ({topk_groups}) must be at most num_groups ({num_groups})")
    candidates = topk_groups * (num_experts // num_groups)
    if top_k > candidates:
        raise TraceError(
            f"top_k ({top_k}) must be at most the {candidates} experts of {topk_groups} groups"
        )
    rng = np.random.default_rng(seed)
    tokens, prefill = _tokens_per_step(num_steps, model.prefill_fraction, rng)
    profiles = rng.standard_normal((model.num_domains, num_layers, num_experts))
    num_updates = -(-num_steps // POPULARITY_UPDATE_STEPS)
    popularity = np.exp(_log_popularity(num_updates, profiles, num_groups, model, rng))
    shares = group_limited_shares(popularity, num_groups, topk_groups)
    # A prefill step is one domain's batch: its popularity leans towards that domain's profile.
    domain = np.full(num_steps, -1)
    domain[prefill] = rng.integers(0, model.num_domains, size=int(prefill.sum()))
    burst_factor = np.exp(model.burst_skew * profiles)

    loads = np.empty((num_steps, num_layers, num_experts))
    for start in range(0, num_steps, SAMPLING_BLOCK_STEPS):
        steps = np.arange(start, min(start + SAMPLING_BLOCK_STEPS, num_steps))
        update = steps // POPULARITY_UPDATE_STEPS
        step_shares = shares[update]
        burst = prefill[steps]
        burst_popularity = popularity[update[burst]]
        burst_popularity *= burst_factor[domain[steps[burst]]]
        step_shares[burst] = group_limited_shares(burst_popularity, num_groups, topk_groups)
        loads[steps] = _sample_counts(step_shares, tokens[steps], top_k, model.step_noise, rng)
    return loads


def model_trace(
    preset: str | ModelSpec,
    num_steps: int = 1200,
    seed: int = 0,
    model: TraceModel = CALIBRATED,
    num_groups: int | None = None,
) -> np.ndarray:
    """`synthetic_trace` in the shape of a model preset: its MoE layers, experts, groups and
    routing (top-k, top groups); a model without group-limited routing as one group.

    Args:
        preset: a model preset's name (`tape.presets.model_presets()`), or a `ModelSpec`.
        num_steps, seed, model: as `synthetic_trace`.
        num_groups: expert groups instead of the model's (the CLI's --groups), only for a
            model with group-limited routing.

    Returns:
        [steps, L, E] float64 token counts, as `synthetic_trace`.

    Raises:
        ConfigError: an unknown preset. TraceError: `num_groups` for a model without groups,
            or as `synthetic_trace`.
    """
    from tape.presets import ModelSpec, model_preset

    spec = preset if isinstance(preset, ModelSpec) else model_preset(preset)
    if spec.num_groups is None:
        if num_groups is not None and num_groups != 1:
            raise TraceError(f"{spec.name} routes without expert groups; num_groups applies "
                             f"only to a model with group-limited routing")
        groups, topk_groups = 1, 1
    else:
        groups = spec.num_groups if num_groups is None else num_groups
        topk_groups = spec.topk_groups
    return synthetic_trace(num_steps=num_steps, num_layers=spec.num_layers,
                           num_experts=spec.num_experts, num_groups=groups, top_k=spec.top_k,
                           topk_groups=topk_groups, seed=seed, model=model)
