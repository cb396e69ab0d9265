"""Plain-loop readings of SPEC's "The seed's metrics", for tests and benchmarks.

Each function follows the SPEC text word for word with Python loops over layers, experts,
replicas and GPUs. It reads only `phy2log`, `log2phy` and `logcnt` of the placement and the
four integers of the layout, and never imports `tape.metrics`: it is the reference that the
vectorized module is checked against. Slow by design.

An all-zero load makes mean / max = 0 / 0; these readings take that as 1.0, as tape.metrics does.
"""

from __future__ import annotations

__all__ = [
    "balancedness_score",
    "communication_cost",
    "communication_score",
    "gpu_balancedness",
    "timeline",
    "weight_copy_cost",
    "weight_copy_score",
]


def _ratio(numerator, denominator):
    return 1.0 if denominator == 0 else numerator / denominator


def _geometry(layout):
    """(G, slots per GPU k, GPUs per node)."""
    return (
        layout.num_gpus,
        layout.num_replicas // layout.num_gpus,
        layout.num_gpus // layout.num_nodes,
    )


def _cost(gpu_a, gpu_b, gpus_per_node):
    """0 on the same GPU, 1 within a node, 18 across nodes."""
    if gpu_a == gpu_b:
        return 0.0
    if gpu_a // gpus_per_node == gpu_b // gpus_per_node:
        return 1.0
    return 18.0


def _replica_slots(placement, layer, expert):
    """The expert's slots in log2phy order (the first is the primary)."""
    return [slot for slot in placement.log2phy[layer][expert].tolist() if slot >= 0]


def _slot_loads(placement, weight):
    """Per layer, per slot: weight[l][e] / logcnt[l][e] for the slot's expert e."""
    phy2log = placement.phy2log.tolist()
    logcnt = placement.logcnt.tolist()
    weight = weight.tolist()
    loads = []
    for layer, experts in enumerate(phy2log):
        loads.append([weight[layer][e] / logcnt[layer][e] for e in experts])
    return loads


def _gpu_loads(placement, weight, layout):
    num_gpus, slots_per_gpu, _ = _geometry(layout)
    loads = []
    for slot_loads in _slot_loads(placement, weight):
        gpu = [0.0] * num_gpus
        for slot, load in enumerate(slot_loads):
            gpu[slot // slots_per_gpu] += load
        loads.append(gpu)
    return loads


def _sum_mean_over_sum_max(per_layer):
    mean_sum = 0.0
    max_sum = 0.0
    for values in per_layer:
        mean_sum += sum(values) / len(values)
        max_sum += max(values)
    return _ratio(mean_sum, max_sum)


def balancedness_score(placement, weight):
    return _sum_mean_over_sum_max(_slot_loads(placement, weight))


def gpu_balancedness(placement, weight, layout):
    return _sum_mean_over_sum_max(_gpu_loads(placement, weight, layout))


def communication_cost(placement, weight, layout):
    num_gpus, slots_per_gpu, gpus_per_node = _geometry(layout)
    actual = 0.0
    minimum = 0.0
    total = 0.0
    for layer in range(placement.num_layers):
        for expert in range(placement.num_experts):
            tokens = float(weight[layer][expert])
            total += tokens
            slots = _replica_slots(placement, layer, expert)
            replicas = len(slots)
            per_replica = tokens / (num_gpus * replicas)
            for source in range(num_gpus):
                for slot in slots:
                    actual += per_replica * _cost(source, slot // slots_per_gpu, gpus_per_node)
                minimum += per_replica * (min(replicas, gpus_per_node) - 1) * 1.0
    return actual, minimum, total


def communication_score(placement, weight, layout):
    actual, minimum, total = communication_cost(placement, weight, layout)

    def exposed(value):
        return max(value - 0.1 * total, 0.0)

    if exposed(actual) == 0:
        return 0.0
    return 10.0 * exposed(minimum) / exposed(actual)


def weight_copy_cost(placement, layout):
    _, slots_per_gpu, gpus_per_node = _geometry(layout)
    actual = 0.0
    minimum = 0.0
    for layer in range(placement.num_layers):
        for expert in range(placement.num_experts):
            primary, *copies = _replica_slots(placement, layer, expert)
            for slot in copies:
                actual += _cost(primary // slots_per_gpu, slot // slots_per_gpu, gpus_per_node)
            room_on_primary_gpu = slots_per_gpu - 1
            for index in range(len(copies)):
                minimum += 0.0 if index < room_on_primary_gpu else 1.0
    return actual, minimum


def weight_copy_score(placement, layout):
    actual, minimum = weight_copy_cost(placement, layout)
    if actual == 0:
        return 1.0
    return min(minimum / actual, 1.0)


def timeline(placement, weight, layout):
    """{"overall_balancedness", "compute_balancedness", "efficiency"}, SPEC's words as loops: a
    single send is one expert's tokens from one source GPU a to one replica on GPU b != a,
    cost c(a, b) * w / (G * r); send[a] / receive[b] the largest single send from a / into b."""
    num_gpus, slots_per_gpu, gpus_per_node = _geometry(layout)
    compute_sum = [0.0] * num_gpus
    work_sum = [0.0] * num_gpus
    for layer, gpu_compute in enumerate(_gpu_loads(placement, weight, layout)):
        send = [0.0] * num_gpus
        receive = [0.0] * num_gpus
        for expert in range(placement.num_experts):
            load = float(weight[layer][expert])
            if load == 0:
                continue
            slots = _replica_slots(placement, layer, expert)
            for source in range(num_gpus):
                for slot in slots:
                    target = slot // slots_per_gpu
                    if target == source:
                        continue
                    cost = _cost(source, target, gpus_per_node) * load / (num_gpus * len(slots))
                    send[source] = max(send[source], cost)
                    receive[target] = max(receive[target], cost)
        for gpu in range(num_gpus):
            compute_sum[gpu] += gpu_compute[gpu]
            work_sum[gpu] += max(gpu_compute[gpu], max(send[gpu], receive[gpu]))
    mean_compute = sum(compute_sum) / num_gpus
    return {
        "overall_balancedness": _ratio(sum(work_sum) / num_gpus, max(work_sum)),
        "compute_balancedness": _ratio(mean_compute, max(compute_sum)),
        "efficiency": _ratio(mean_compute, max(work_sum)),
    }
