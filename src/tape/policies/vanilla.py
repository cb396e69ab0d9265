"""`vanilla`: no balancing; expert e lives on GPU e // (E / G), in slot order.

With more slots than experts (S > E), each GPU's spare slots hold extra copies of that GPU's
own experts, hottest first (cycling through them when there are more spare slots than own
experts). Every token of an expert still lands on its home GPU, so GPU loads and traffic are
exactly vanilla's; the copies only split a hot expert's load over more slots. The own slot is
each expert's primary replica. Such a GPU can hold two replicas of one expert, by design.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.placement import Placement
from tape.policies import PolicyError, register
from tape.policies.packing import descending_order, placement_from_ranks, take_rows

__all__ = ["home_slots", "vanilla"]


@register("vanilla")
def vanilla(weight: np.ndarray, layout: Layout) -> Placement:
    """The vanilla placement (loads only order the copies).

    Args:
        weight: [L, E] float64, each expert's load; E must be a multiple of G.
        layout: the cluster.

    Returns:
        Placement with each expert's own slot first in `log2phy`.
    """
    num_layers, num_experts = weight.shape
    num_gpus = layout.num_gpus
    own_per_gpu, spare = home_slots(num_experts, layout, "vanilla puts E / G experts on each GPU")
    own = np.broadcast_to(
        np.arange(num_experts).reshape(1, num_gpus, own_per_gpu),
        (num_layers, num_gpus, own_per_gpu),
    )
    # Copy j of a GPU's spare slots holds its (j mod E/G)-th hottest own expert, as replica
    # number 1 + j // (E/G).
    copy = np.arange(spare)
    hottest = descending_order(weight.reshape(-1, own_per_gpu))[:, copy % own_per_gpu]
    copies = take_rows(own.reshape(-1, own_per_gpu), hottest)
    phy2log = np.concatenate([own, copies.reshape(num_layers, num_gpus, spare)], axis=2)
    rank = np.concatenate(
        [
            np.zeros((num_layers, num_gpus, own_per_gpu), dtype=np.int64),
            np.broadcast_to(1 + copy // own_per_gpu, (num_layers, num_gpus, spare)),
        ],
        axis=2,
    )
    return placement_from_ranks(
        phy2log.reshape(num_layers, -1), rank.reshape(num_layers, -1), num_experts
    )


def home_slots(num_experts: int, layout: Layout, why: str) -> tuple[int, int]:
    """(E / G experts each GPU homes, the spare slots each GPU has beside them); PolicyError,
    starting with `why`, unless G divides E."""
    if num_experts % layout.num_gpus:
        raise PolicyError(
            f"{why}, so the number of experts ({num_experts}) must be a multiple of num_gpus "
            f"({layout.num_gpus})"
        )
    own_per_gpu = num_experts // layout.num_gpus
    return own_per_gpu, layout.slots_per_gpu - own_per_gpu
