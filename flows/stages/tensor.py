"""DecodeTensor: ``.pt`` and ``.npy`` bytes to tensors."""

from __future__ import annotations

import io as _io
import threading

import numpy as np
import torch

from flows.stages.base import Stage

_NPY_HEADER_LOCK = threading.Lock()


class DecodeTensor(Stage):
    """Decode ``.pt`` (``torch.load(weights_only=True)``) or ``.npy`` bytes into ``item["tensor"]``."""

    name = "decode_tensor"

    def __init__(self, field: str = "bytes", to: str = "tensor"):
        self.field, self.to = field, to

    def __call__(self, item: dict) -> dict:
        data = item[self.field]
        if data[:6] == b"\x93NUMPY":
            with _NPY_HEADER_LOCK:  # np.load parses the header with ast: not thread-safe on 3.11
                array = np.load(_io.BytesIO(data), allow_pickle=False)
            tensor = torch.from_numpy(array)
        else:
            tensor = torch.load(_io.BytesIO(data), weights_only=True, map_location="cpu")
        out = {k: v for k, v in item.items() if k != self.field}
        out[self.to] = tensor
        return out
