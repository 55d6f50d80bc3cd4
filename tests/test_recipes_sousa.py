"""SOUSA recipe on synthetic copies in both layouts (local and Hugging Face): class, score and
multi-task targets, profile splits, 16 kHz variable- and fixed-length batches with lengths and
attention masks, stratified batches, label maps, training and ``flows train sousa``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from flows.training.cli import main
from flows.training.tasks import Classification, MultiTask, Regression
from flows.training.train import TrainConfig, train
from recipes.sousa import SKILL_TIERS, Sousa


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("sousa")
    return {"local": str(Sousa.generate(base / "local", n_samples=32)),
            "hf": str(Sousa.generate(base / "hf", n_samples=32, layout="hf"))}


def everything(flow) -> list[dict]:
    return list(flow.loader(prefetch=0))


def column(batches: list[dict], name: str) -> list:
    return [v for b in batches for v in (b[name].tolist() if torch.is_tensor(b[name]) else b[name])]


@pytest.mark.parametrize("layout", ["local", "hf"])
def test_class_target_variable_length_batches(roots: dict[str, str], layout: str) -> None:
    recipe = Sousa(Sousa.Config(data_dir=roots[layout], batch_size=4))
    assert recipe.layout == layout
    assert recipe.label_maps() == {"skill_tier_id": list(SKILL_TIERS)}
    assert isinstance(recipe.task(), Classification)
    batches = everything(recipe.train_flow())
    for batch in batches:
        n = len(batch["sample_id"])
        assert batch["audio"].shape[:2] == (n, 1) and batch["sample_rate"].tolist() == [16_000] * n
        assert batch["attention_mask"].sum(1).tolist() == batch["lengths"].tolist()
        assert batch["audio"].shape[-1] == max(batch["lengths"].tolist())
        expected = [round(d * 16_000) for d in batch["duration_sec"].tolist()]
        assert all(abs(a - b) <= 2 for a, b in zip(batch["lengths"].tolist(), expected, strict=True))
        assert [SKILL_TIERS[i] for i in batch["skill_tier_id"]] == batch["skill_tier"]
        # stratified: the four tiers take turns
        assert len(set(batch["skill_tier"])) == min(n, 4)
        output = recipe.model()(recipe.task().inputs(batch))
        assert output.shape == (n, 4)


def test_splits_are_by_profile_and_layouts_agree(roots: dict[str, str]) -> None:
    splits = json.loads((Path(roots["local"]) / "splits.json").read_text())
    seen: dict[str, set[str]] = {}
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        ids = {}
        for layout in ("local", "hf"):
            recipe = Sousa(Sousa.Config(data_dir=roots[layout], eval_split=split, batch_size=64))
            batches = everything(recipe.eval_flow())
            ids[layout] = sorted(column(batches, "sample_id"))
            assert set(column(batches, "profile_id")) <= set(splits[f"{key}_profile_ids"])
        assert ids["local"] == ids["hf"] and ids["local"]
        seen[split] = set(ids["local"])
    assert not (seen["train"] & seen["validation"]) and not (seen["train"] & seen["test"])


@pytest.mark.parametrize("layout", ["local", "hf"])
def test_score_targets_are_normalised(roots: dict[str, str], layout: str) -> None:
    recipe = Sousa(Sousa.Config(data_dir=roots[layout], target="overall_score,groove_feel_proxy"))
    batches = everything(recipe.eval_flow())
    scores = torch.tensor(column(batches, "overall_score_norm"))
    assert scores.dtype == torch.float32 and scores.min() >= 0 and scores.max() <= 1
    assert torch.allclose(scores, torch.tensor(column(batches, "overall_score")).float() / 100)
    assert torch.allclose(torch.tensor(column(batches, "groove_feel_proxy_norm")),
                          torch.tensor(column(batches, "groove_feel_proxy")).float())
    task = recipe.task()
    assert isinstance(task, MultiTask) and all(isinstance(t, Regression) for t in task.heads.values())


def test_nullable_score_keeps_only_known_rows(roots: dict[str, str]) -> None:
    exercises = pd.read_parquet(Path(roots["local"]) / "labels" / "exercises.parquet")
    known = set(exercises.dropna(subset=["diddle_quality"]).sample_id)
    for layout in ("local", "hf"):
        recipe = Sousa(Sousa.Config(data_dir=roots[layout], target="diddle_quality",
                                    eval_split="train"))
        ids = column(everything(recipe.eval_flow()), "sample_id")
        assert ids and set(ids) <= known


def test_multi_task_fixed_length_trains(roots: dict[str, str], tmp_path: Path) -> None:
    config = Sousa.Config(data_dir=roots["hf"], target="skill_tier,rudiment_slug,overall_score",
                          seconds=1.0, batch_size=8, epochs=1)
    recipe = Sousa(config)
    batch = everything(recipe.train_flow())[0]
    assert batch["audio"].shape == (8, 1, 16_000)
    assert batch["lengths"].max() <= 16_000
    assert batch["attention_mask"].sum(1).tolist() == batch["lengths"].tolist()
    output = recipe.model()(batch["audio"])
    assert {k: v.shape[1] for k, v in output.items()} == {
        "skill_tier": 4, "rudiment_slug": len(recipe.label_maps()["rudiment_slug_id"]), "overall_score": 1}
    result = train(recipe, TrainConfig(progress=False))
    assert {"skill_tier/accuracy", "rudiment_slug/accuracy", "overall_score/mae"} <= set(result.metrics)
    path = recipe.export_label_maps(tmp_path / "labels.json")
    assert json.loads(path.read_text())["skill_tier_id"] == list(SKILL_TIERS)


def test_max_length_without_padding(roots: dict[str, str]) -> None:
    recipe = Sousa(Sousa.Config(data_dir=roots["local"], seconds=0.5, pad=False, batch_size=64))
    batch = everything(recipe.eval_flow())[0]
    assert batch["lengths"].max() <= 8000 and batch["audio"].shape[-1] == batch["lengths"].max()


def test_flows_train_sousa(roots: dict[str, str], tmp_path: Path) -> None:
    code = main(["train", "sousa", "--data-dir", roots["local"], "--target", "skill_tier_binary",
                 "--seconds", "1", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 0
