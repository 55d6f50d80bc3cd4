"""Recipes: a config dataclass, train/eval flows, a model and a task, known by name so
``flows train NAME`` runs them.

The registry never imports a recipes package: a distribution declares its recipes as entry
points of the ``flows.recipes`` group (this project's ``recipes/`` package does so in
``pyproject.toml``), loaded when one is asked for by name; a recipe class decorated with
:func:`register` in a module already imported is known too, and ``"package.module:Class"``
names any recipe class."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from flows.errors import FlowsError
from flows.flow import Flow
from flows.training.tasks import Task


@dataclass
class RecipeConfig:
    """Knobs every recipe has; recipes subclass it to add their own (each field becomes a CLI
    option ``--field-name``)."""

    data_dir: str | None = field(default=None, metadata={"help": "the data: a path or fsspec URL"})
    epochs: int = field(default=10, metadata={"help": "epochs to train"})
    batch_size: int = field(default=16, metadata={"help": "samples per batch"})
    num_workers: int = field(default=0, metadata={"help": "worker threads running the stages"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    seed: int = field(default=0, metadata={"help": "seeds the model, the order, the augmentation"})
    storage_options: dict | None = field(
        default=None, metadata={"help": "fsspec options for the data, as JSON"})


class Recipe:
    """Base class: subclasses set ``name``, ``Config`` and implement the methods."""

    name: ClassVar[str]
    Config: ClassVar[type[RecipeConfig]] = RecipeConfig
    #: told to users whose data directory is missing: how to download or generate the data
    data_hint: ClassVar[str] = ""
    #: when the training loop steps the LR scheduler: after each epoch or each optimizer step
    schedule_every: ClassVar[Literal["epoch", "step"]] = "epoch"

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


REGISTRY: dict[str, type[Recipe]] = {}  # recipes registered by the modules imported so far
ENTRY_POINTS = "flows.recipes"  # the entry-point group distributions declare their recipes in


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make a recipe available to ``flows train NAME``."""
    REGISTRY[cls.name] = cls
    return cls


def recipe_names() -> list[str]:
    """Every recipe name known: registered so far, or declared by an installed distribution."""
    return sorted(set(REGISTRY) | {point.name for point in entry_points(group=ENTRY_POINTS)})


def get_recipe(name: str) -> type[Recipe]:
    """The recipe registered or declared (entry point) under ``name``, or the class at
    ``"package.module:Class"`` (a recipe of one's own, kept anywhere)."""
    if ":" not in name and name not in REGISTRY:
        declared = [point.value for point in entry_points(group=ENTRY_POINTS, name=name)]
        if not declared:
            known = ", ".join(recipe_names()) or ("none: no installed distribution declares one "
                                                  f"(entry points {ENTRY_POINTS!r}; pip install -e . "
                                                  "declares this project's)")
            raise FlowsError(f"unknown recipe {name!r}; known recipes: {known}; or name a recipe "
                             "class as package.module:Class")
        name = declared[0]
    if ":" not in name:
        return REGISTRY[name]
    module, _, attribute = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise FlowsError(f"cannot load recipe {name!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise FlowsError(f"{name!r} is not a Recipe subclass")
    return cls


def make_config(cls: type[Recipe], **values: Any) -> RecipeConfig:
    """The recipe's config with ``values`` (None values keep the defaults)."""
    names = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FlowsError(f"recipe {cls.name!r} has no option(s) {unknown}; it has {sorted(names)}")
    return cls.Config(**{k: v for k, v in values.items() if v is not None})
