"""Conversion between numpy arrays and torch tensors, without importing torch.

vLLM and SGLang hand torch tensors in; TAPE computes in numpy and hands back the kind it got.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from tape.errors import TapeError

__all__ = ["dense_numpy", "is_torch_tensor", "like_input", "to_numpy"]


def is_torch_tensor(value: Any) -> bool:
    """True when `value` is a torch tensor (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view or copy of an array-like, a torch tensor on any device included.

    Floating-point tensors of a dtype numpy lacks (bfloat16, the float8 kinds) are read as
    float32, which holds each of their values exactly.
    """
    if is_torch_tensor(value):
        torch = sys.modules["torch"]
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (
            torch.float16, torch.float32, torch.float64
        ):
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(value)


def dense_numpy(value: Any, name: str, error: type[TapeError]) -> np.ndarray:
    """`to_numpy(value)`; `error` naming `name` for a torch tensor that holds no dense values
    (a sparse tensor, a meta tensor), where torch would raise TypeError or NotImplementedError."""
    if is_torch_tensor(value):
        if value.is_meta:
            raise error(f"{name} is a meta tensor, which holds no values; pass a tensor with data")
        if value.layout != sys.modules["torch"].strided:
            raise error(f"{name} is a {value.layout} tensor; pass a dense one (.to_dense())")
    return to_numpy(value)


def like_input(array: np.ndarray, template: Any) -> Any:
    """`array` as the same kind as `template`: a torch tensor on its device, else numpy."""
    if is_torch_tensor(template):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(template.device)
    return array
