"""Collation: lists of sample dicts into batch dicts.

Tensors of equal shape are stacked. With ``variable=True`` the ``audio`` field (or another
``length_key``) is right-padded to the longest and the batch carries ``lengths`` and an
``attention_mask`` (True on real frames). Numbers become tensors; strings and anything else
(ids, paths, metadata, numbers with gaps) stay lists, so a batch keeps its labels and extra columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch

from flows.errors import FlowsError


@dataclass(frozen=True)
class Collate:
    """Turn a list of items into one batch (see the module docstring)."""

    variable: bool = False
    length_key: str = "audio"
    pad_value: float = 0.0

    def __call__(self, items: Sequence[Any]) -> Any:
        first = items[0]
        if isinstance(first, torch.Tensor):
            return self._tensors("item", list(items))
        if not isinstance(first, dict):
            return list(items)
        batch: dict[str, Any] = {}
        for key in first:
            values = [item[key] for item in items]
            if isinstance(values[0], torch.Tensor):
                if self.variable and key == self.length_key:
                    batch.update(self._padded(values))
                else:
                    batch[key] = self._tensors(key, values)
            elif all(isinstance(v, (Number, bool)) for v in values):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        return batch

    def _tensors(self, key: str, values: list[torch.Tensor]) -> torch.Tensor:
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise FlowsError(
                f"cannot stack field {key!r}: shapes differ {sorted(shapes)[:4]}; pad or crop to "
                f"a fixed length (.pad(n) / .crop(n)) or batch with variable=True"
            )
        return torch.stack(values)

    def _padded(self, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([v.shape[-1] for v in values])
        longest = int(lengths.max())
        padded = torch.stack(
            [torch.nn.functional.pad(v, (0, longest - v.shape[-1]), value=self.pad_value) for v in values]
        )
        mask = torch.arange(longest)[None, :] < lengths[:, None]
        return {self.length_key: padded, "lengths": lengths, "attention_mask": mask}
