"""`Rebalancer`: a `rebalance_experts` for a serving engine that remembers what it needs.

A serving engine (vLLM, SGLang) calls its load balancer with one window's loads and nothing
else: not the placement in force, not the earlier windows. The `tape` policy uses both (it keeps
experts where they are and forecasts from the earlier windows), and `min-moves` uses the
placement in force. A `Rebalancer` keeps them between calls: the placement it returned last and
the windows it was given, up to `history_windows` of them, and passes them to the policy, so it
can stand in for DeepSeek EPLB's entry point with the same arguments and the same outputs.

The engine may pass the placement in force itself (`previous_phy2log`; recent vLLM versions
have it as `old_global_expert_indices`): then that one is used, not the remembered one. What is
remembered is kept per shape, (layers, experts, slots): a call of a shape not seen before starts
afresh, and an engine that balances two models through one policy (vLLM calls its policy for
each model it serves, a speculative-decoding drafter with MoE layers included) keeps each
model's windows and placement apart. The `SHAPES_KEPT` shapes used last are kept. A call that
raises leaves the remembered state as it was.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tape.api import rebalance_experts
from tape.arrays import dense_numpy, like_input
from tape.errors import TraceError, checked_integer
from tape.policies import PolicyError, check_params, get_policy
from tape.policies.tape.forecast import MEMORY

__all__ = ["MAX_HISTORY_WINDOWS", "SHAPES_KEPT", "Rebalancer"]

SHAPES_KEPT = 4
"""How many shapes (layers, experts, slots) a `Rebalancer` remembers, the ones used last."""

MAX_HISTORY_WINDOWS = 1024
"""The most earlier windows a `Rebalancer` keeps (memory and each call's time grow with them)."""



@dataclass
class _Memory:
    """What a `Rebalancer` keeps for one shape: the earlier windows and its last placement."""

    windows: deque[np.ndarray]
    previous: np.ndarray | None = field(default=None)


class Rebalancer:
    """DeepSeek EPLB's `rebalance_experts`, stateful: it passes the policy the placement in force
    and the earlier windows (module doc).

    Args:
        policy: a registered policy name (`tape.policies.policy_names()`); "tape" by default.
        history_windows: how many earlier windows to keep and pass as `history` (0 keeps none,
            at most MAX_HISTORY_WINDOWS); by default the 15 that `tape`'s forecast reads. A
            window of no load at all (vLLM's profile run) is not kept.
        **params: the policy's own parameters, e.g. `preset="fast"` for `tape`.

    Raises:
        PolicyError: an unknown policy, a bad `history_windows`, or parameters the policy does
            not take or refuses: checked here (`tape.policies.check_params`, without placing
            anything), rather than at the engine's first rebalance.

    Example:
        >>> rebalance = Rebalancer("tape", preset="all")
        >>> phy2log, log2phy, logcnt = rebalance(weight, 288, 8, 4, 32)   # doctest: +SKIP
    """

    def __init__(self, policy: str = "tape", *, history_windows: int = MEMORY - 1,
                 **params: Any) -> None:
        get_policy(policy)
        self.policy = policy
        self.history_windows = checked_integer(history_windows, "history_windows", PolicyError,
                                               minimum=0)
        if self.history_windows > MAX_HISTORY_WINDOWS:
            raise PolicyError(f"history_windows must be at most {MAX_HISTORY_WINDOWS}, got "
                              f"{history_windows}")
        self.params = dict(params)
        check_params(policy, self.params)
        self._lock = threading.Lock()
        # by (L, E, S), the shape used last at the end
        self._memory: OrderedDict[tuple[int, int, int], _Memory] = OrderedDict()

    @property
    def windows_kept(self) -> int:
        """How many earlier windows the next call of the last call's shape passes as `history`."""
        if not self._memory:
            return 0
        return len(self._memory[next(reversed(self._memory))].windows)

    def reset(self) -> None:
        """Forget the remembered placements and the earlier windows, of every shape."""
        with self._lock:
            self._memory.clear()

    def __call__(
        self,
        weight: Any,
        num_replicas: int,
        num_groups: int | None,
        num_nodes: int,
        num_gpus: int,
        *,
        previous_phy2log: Any | None = None,
    ) -> tuple[Any, Any, Any]:
        """Place the experts of every layer; remember the result and the window.

        Args:
            weight: [L, E] load of each logical expert in the window (vLLM's), or [T, L, E] per
                forward step, summed over T (SGLang's `tokens_per_expert`); a torch tensor on any
                device or an array-like, finite and non-negative.
            num_replicas: S, physical expert slots per layer.
            num_groups: expert groups; None means one (SGLang's models without groups).
            num_nodes: N, server nodes.
            num_gpus: G, GPUs (SGLang: `num_physical_experts // num_local_physical_experts`).
            previous_phy2log: optional [L, S] placement in force; by default the one this
                rebalancer returned last for loads and slots of these shapes.

        Returns:
            phy2log [L, S], log2phy [L, E, X] and logcnt [L, E], int64, as `rebalance_experts`
            returns them: torch tensors on `weight`'s device when `weight` is a torch tensor.
        """
        load = _window_load(weight)
        with self._lock:
            shape = (*load.shape, num_replicas)
            memory = self._memory.get(shape)
            remembered = None if memory is None else memory.previous
            outputs = rebalance_experts(
                load, num_replicas, 1 if num_groups is None else num_groups, num_nodes,
                num_gpus, policy=self.policy,
                previous_phy2log=remembered if previous_phy2log is None else previous_phy2log,
                history=np.stack(memory.windows) if memory and memory.windows else None,
                **self.params,
            )
            # stored only now: a call that raises changes nothing
            if memory is None:
                memory = self._memory[shape] = _Memory(deque(maxlen=self.history_windows))
                while len(self._memory) > SHAPES_KEPT:
                    self._memory.popitem(last=False)  # the shape used longest ago
            self._memory.move_to_end(shape)
            memory.previous = outputs[0].copy()  # not the array handed out, which the engine owns
            if load.any():  # an all-zero window (vLLM's profile run) says nothing of the load
                memory.windows.append(load)  # a no-op with history_windows 0 (maxlen 0)
        return tuple(like_input(array, weight) for array in outputs)


def _window_load(weight: Any) -> np.ndarray:
    """`weight` as a float64 [L, E] array: a [T, L, E] one summed over its first axis."""
    load = dense_numpy(weight, "weight", TraceError)
    if load.ndim not in (2, 3):
        raise TraceError(
            f"weight must be [layers, experts] or [steps, layers, experts], got shape "
            f"{list(load.shape)}"
        )
    if load.dtype.kind not in "iuf":
        raise TraceError(f"weight must hold numbers, got dtype {load.dtype}")
    if load.size == 0:
        raise TraceError(f"weight is empty (shape {list(load.shape)}); give at least one step")
    if load.ndim == 3:
        return load.sum(axis=0, dtype=np.float64)
    return np.array(load, dtype=np.float64)
