"""`tape`: TAPE's own placement policy, balance-, migration- and locality-aware.

The policy's steps, one module each, batched over layers (docs/tape-policy.md):

    forecast   the next window's loads from the window to balance and the earlier ones
    counts     how many replicas each expert gets
    packing    which slots the replicas take (a first placement, or from the one in force)
    search     swaps between the heaviest and lightest GPUs
    state      the slot state the packing and the search share
    policy     the registered function `tape_policy`, its parameters and presets

Importing this package registers the policy under the name "tape".
"""

from tape.policies.tape.policy import PARAMETER_HELP, PRESETS, SEARCH_SPACE, tape_policy

__all__ = ["PARAMETER_HELP", "PRESETS", "SEARCH_SPACE", "tape_policy"]
