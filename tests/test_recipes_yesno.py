"""YESNO recipe: the real corpus (loaded exactly, and learned), synthetic copies, the verified
download from a local HTTP server, and ``flows train yesno``."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flows.errors import FlowsError
from flows.testing import assert_same
from flows.training.cli import main
from flows.training.tasks import SequenceLabels
from flows.training.train import TrainConfig, train
from recipes.yesno import YesNo

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/yesno/waves_yesno"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"the real YESNO corpus is not at {REAL}")


def words(key: str) -> list[int]:
    return [int(w) for w in key.removesuffix(".wav").split("_")]


def everything(flow) -> list[dict]:
    return list(flow.loader(prefetch=0))


@needs_real
def test_real_corpus_is_loaded_exactly() -> None:
    recipe = YesNo(YesNo.Config(data_dir=str(REAL.parent)))
    raw = everything(recipe.flow().read().decode_audio())
    assert len(raw) == 60
    assert {item["sample_rate"] for item in raw} == {8000}
    assert {item["audio"].shape[0] for item in raw} == {1}  # mono
    for item in raw:
        assert item["labels"].tolist() == words(item["key"])
    train_keys = [k for b in everything(recipe.train_flow()) for k in b["key"]]
    eval_batches = everything(recipe.eval_flow())
    eval_keys = [k for b in eval_batches for k in b["key"]]
    assert (len(train_keys), len(eval_keys)) == (48, 12)
    assert sorted(train_keys + eval_keys) == sorted(item["key"] for item in raw)
    for batch in eval_batches:
        assert batch["labels"].tolist() == [words(k) for k in batch["key"]]
        assert batch["sample_rate"].tolist() == [8000] * len(batch["key"])


@needs_real
def test_real_corpus_is_learned() -> None:
    """Per-word accuracy on the 12 held-out files after 10 quick epochs (~3 s of CPU)."""
    recipe = YesNo(YesNo.Config(data_dir=str(REAL.parent), seed=0))
    result = train(recipe, TrainConfig(progress=False))
    assert result.metrics["accuracy"] >= 0.9, result.metrics


def test_synthetic_batches_model_and_task(tmp_path: Path) -> None:
    root = YesNo.generate(tmp_path, n_files=10)
    recipe = YesNo(YesNo.Config(data_dir=str(root), batch_size=4))
    batches = everything(recipe.train_flow())
    assert [len(b["key"]) for b in batches] == [4, 4]
    batch = batches[0]
    assert batch["audio"].shape == (4, 1, round(4.8 * 8000))
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [words(k) for k in batch["key"]]
    assert batch["attention_mask"].shape == (4, 38400) and batch["lengths"].tolist() == [38400] * 4
    model, task = recipe.model(), recipe.task()
    output = model(task.inputs(batch))
    assert isinstance(task, SequenceLabels) and output.shape == (4, 8, 2)
    assert torch.isfinite(task.loss(output, batch))
    assert recipe.label_maps() == {"labels": ["no", "yes"]}
    # the stages cross process boundaries, and workers change nothing
    pickle.dumps(recipe.train_flow().stages)
    assert_same(everything(recipe.train_flow()),
                list(recipe.train_flow().loader(num_workers=2, method="process", prefetch=0)))


def test_data_dir_may_be_the_corpus_folder_itself(tmp_path: Path) -> None:
    YesNo.generate(tmp_path, n_files=5)
    recipe = YesNo(YesNo.Config(data_dir=str(tmp_path / "waves_yesno")))
    assert len(recipe.flow().source) == 5  # type: ignore[arg-type]


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server: (its base URL, the folder it serves)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_verifies_and_extracts(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, served = http_root
    YesNo.generate(tmp_path / "src", n_files=6)
    archive = served / "waves_yesno.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "waves_yesno", arcname="waves_yesno")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{base}/waves_yesno.tar.gz"

    missing = YesNo(YesNo.Config(data_dir=str(tmp_path / "none")))
    with pytest.raises(FlowsError, match="--download"):
        missing.train_flow()

    wrong = YesNo(YesNo.Config(data_dir=str(tmp_path / "bad"), download=True, url=url, sha256="0" * 64))
    with pytest.raises(FlowsError, match="SHA-256 mismatch"):
        wrong.train_flow()
    assert not (tmp_path / "bad" / "waves_yesno").exists()

    recipe = YesNo(YesNo.Config(data_dir=str(tmp_path / "data"), download=True, url=url, sha256=digest))
    keys = sorted(k for flow in (recipe.train_flow(), recipe.eval_flow())
                  for b in everything(flow) for k in b["key"])
    assert keys == sorted(p.name for p in (tmp_path / "src" / "waves_yesno").glob("*.wav"))

    # the command line: --download into a data directory that does not exist yet
    code = main(["inspect", "yesno", "--data-dir", str(tmp_path / "new" / "yesno"), "--download",
                 "--url", url, "--sha256", digest, "--out", str(tmp_path / "inspect")])
    assert code == 0
    assert len(list((tmp_path / "new" / "yesno" / "waves_yesno").glob("*.wav"))) == 6


def test_flows_train_yesno(tmp_path: Path) -> None:
    YesNo.generate(tmp_path / "data", n_files=8)
    code = main(["train", "yesno", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                 "--checkpoint-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    assert list((tmp_path / "run").iterdir())
