"""TAPE: place, score, evolve and show expert placements for Mixture-of-Experts (MoE) serving.

Glossary:
    layer (L)        an MoE layer; every array is batched over layers.
    logical expert   one of the E experts of a layer (ids 0..E-1), in `num_groups` equal groups
                     of consecutive ids.
    slot / physical expert
                     one of the S = `num_replicas` places that hold an expert's weights;
                     slot s lives on GPU s // k, with k = S / G slots per GPU.
    replica          a slot holding a given logical expert; the first in `log2phy` is the primary.
    GPU (G), node (N)
                     GPU g lives on node g // (G / N).
    phy2log[L, S]    the logical expert of each slot.
    log2phy[L, E, X] the slots of each logical expert, padded with -1 (X = max replica count).
    logcnt[L, E]     replicas of each logical expert (>= 1).
    weight / load[L, E]
                     tokens routed to each logical expert in a window of forward steps.
    trace            loads[steps, L, E]: the tokens routed to each expert in each forward step.
    window (W)       `interval` consecutive forward steps of a trace, summed; a windowed trace
                     or a policy's history is [W, L, E].
    policy           a function from a window's load (and optionally the previous placement and
                     earlier windows) to a placement.
    EPLB             DeepSeek's Expert Parallelism Load Balancer; its `rebalance_experts` is the
                     entry point TAPE's matches, and the `deepseek` policy reproduces it.
    seed             the project TAPE started from: an OpenEvolve evaluator of EPLB policies and
                     a notebook; TAPE reproduces its metrics ("seed metrics", `tape.metrics`)
                     and its baseline policies.
    version          which score ranks policies: the seed's 0, 2, 3, 4 (`tape.metrics`) or
                     "realistic" (the cost model's, `tape.protocol`).
    NVLink, IB       the links within a node (NVLink) and between nodes (InfiniBand, IB).
    dispatch         how a GPU sends its tokens to an expert's replicas: "uniform" or
                     "locality" (`tape.dispatch`); "combine" sends the results back.
    migration        the weight copies that turn one placement into the next.
    FP8, BF16        8-bit float and bfloat16 number formats (weights, bytes per token).
    GEMM             a (grouped) matrix multiply: an expert's compute.
"""

from __future__ import annotations

from tape.api import place, rebalance_experts
from tape.errors import (
    ConfigError,
    LayoutError,
    PlacementError,
    ProgramError,
    TapeError,
    TraceError,
)
from tape.layout import Layout
from tape.placement import Placement
from tape.serving import Rebalancer


def __getattr__(name: str) -> str:
    """`tape.__version__`: the installed distribution's version (pyproject.toml's, the one
    source), read when first asked for (importlib.metadata takes tens of ms to import)."""
    if name != "__version__":
        raise AttributeError(f"module 'tape' has no attribute {name!r}")
    import importlib.metadata

    try:
        return importlib.metadata.version("tape-moe")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__all__ = [
    "ConfigError",
    "Layout",
    "LayoutError",
    "Placement",
    "PlacementError",
    "ProgramError",
    "Rebalancer",
    "TapeError",
    "TraceError",
    "__version__",
    "place",
    "rebalance_experts",
]
