"""`tape`: TAPE's own placement policy, balance-, migration- and locality-aware.

The policy's steps, one module each, batched over layers (docs/tape-policy.md):

    forecast   the next window's loads from the window to balance and the earlier ones
    counts     how many replicas each expert gets
    packing    which slots the replicas take (a first placement, or from the one in force)
    search     swaps between the heaviest and lightest GPUs, and of each heaviest GPU with
               its best partner
    state      the slot state the packing and the search share
    parameters every parameter once (`Parameter`: help, value per preset, ranges); the
               dictionaries PARAMETER_HELP, SEARCH_SPACE and PRESETS are read from it
    policy     the registered function `tape_policy`

Importing this package registers the policy under the name "tape".
"""

from tape.policies.tape.parameters import (
    PARAMETER_HELP,
    PARAMETERS,
    PRESETS,
    SEARCH_SPACE,
    Parameter,
)
from tape.policies.tape.policy import tape_policy

__all__ = ["PARAMETERS", "PARAMETER_HELP", "PRESETS", "SEARCH_SPACE", "Parameter", "tape_policy"]
