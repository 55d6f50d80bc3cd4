"""Recipes: a config dataclass, train/eval flows, a model and a task, registered by name so
``flows train NAME`` runs them. Recipe modules live in the top-level ``recipes/`` package."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from flows.errors import FlowsError
from flows.flow import Flow
from flows.tasks import Task


@dataclass
class RecipeConfig:
    """Knobs every recipe has; recipes subclass it to add their own (each field becomes a CLI
    option ``--field-name``)."""

    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 16
    num_workers: int = 0
    lr: float = 1e-3
    seed: int = 0
    storage_options: dict | None = None


class Recipe:
    """Base class: subclasses set ``name``, ``Config`` and implement the methods."""

    name: ClassVar[str]
    Config: ClassVar[type[RecipeConfig]] = RecipeConfig
    #: told to users whose data directory is missing: how to download or generate the data
    data_hint: ClassVar[str] = ""

    def __init__(self, config: RecipeConfig):
        self.config = config

    def train_flow(self) -> Flow:
        raise NotImplementedError

    def eval_flow(self) -> Flow | None:
        return None

    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def task(self) -> Task:
        raise NotImplementedError

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> Any | None:
        return None

    @classmethod
    def generate(cls, root: str | Path, seed: int = 0) -> Path:
        """Write a small synthetic copy of the dataset in its exact layout; return the data dir."""
        raise NotImplementedError


REGISTRY: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make a recipe available to ``flows train NAME``."""
    REGISTRY[cls.name] = cls
    return cls


def get_recipe(name: str) -> type[Recipe]:
    """The recipe registered under ``name`` (importing the ``recipes`` package first)."""
    importlib.import_module("recipes")
    if name not in REGISTRY:
        raise FlowsError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def make_config(cls: type[Recipe], **values: Any) -> RecipeConfig:
    """The recipe's config with ``values`` (None values keep the defaults)."""
    names = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FlowsError(f"recipe {cls.name!r} has no option(s) {unknown}; it has {sorted(names)}")
    return cls.Config(**{k: v for k, v in values.items() if v is not None})
