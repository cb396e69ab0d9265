"""The experts each GPU holds, as text: the seed notebook's readable assignment.

One line a GPU, `GPU 3: 5 17 42 ...` (the logical experts of its slots, in ascending order; an
expert with two replicas on the GPU appears twice), the GPUs of each node together under a
`node N` heading and nodes set apart by a blank line. `tape place --show LAYER` prints it.
"""

from __future__ import annotations

from tape.errors import ConfigError
from tape.layout import Layout
from tape.placement import Placement

__all__ = ["gpu_assignment_text", "gpu_experts"]


def gpu_experts(placement: Placement, layout: Layout, layer: int) -> list[list[int]]:
    """[G][k] the logical experts held by each GPU's k slots on `layer`, each list ascending.

    Raises:
        ConfigError: a layer outside 0 .. L - 1.
    """
    if not 0 <= layer < placement.num_layers:
        raise ConfigError(f"--show {layer}: the placement has layers 0 to "
                          f"{placement.num_layers - 1}")
    rows = placement.phy2log[layer].reshape(layout.num_gpus, layout.slots_per_gpu)
    return [sorted(int(expert) for expert in row) for row in rows]


def gpu_assignment_text(placement: Placement, layout: Layout, layer: int) -> str:
    """The assignment of `layer` as lines of text (module doc), without a trailing newline."""
    experts = gpu_experts(placement, layout, layer)
    gpu_width = len(str(layout.num_gpus - 1))
    expert_width = len(str(placement.num_experts - 1))
    blocks = []
    for node in range(layout.num_nodes):
        first = node * layout.gpus_per_node
        lines = [f"node {node}"] + [
            f"  GPU {gpu:>{gpu_width}}: " + " ".join(f"{e:>{expert_width}}" for e in experts[gpu])
            for gpu in range(first, first + layout.gpus_per_node)
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
