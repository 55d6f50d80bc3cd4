"""Distributed training under real torchrun processes (2 ranks, gloo, CPU), checked by recording
the sample ids every rank trains on (``tests/dist_worker.py``).

- loaders sharded after the global order is fixed: every epoch is the dataset once (minus the
  stated drops), every rank gets as many batches (fixed, stratified, bucketed, mixed), and one
  loader state stands for every rank;
- ``train()`` from Python and ``flows train`` under torchrun: DDP, metrics reduced over ranks,
  rank 0 writing checkpoints;
- a 2-rank run killed with SIGKILL and resumed on 2 ranks continues identically (same samples,
  bit-identical parameters); a 2-rank checkpoint resumes on 1 rank and a 1-rank one on 2 ranks
  with the same global batch size, continuing the global sample order exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from flows import Flow
from flows.errors import FlowsError
from flows.training.checkpoint import CheckpointManager
from flows.training.metrics_log import read_log
from flows.training.train import TrainConfig, train
from tests.dist_worker import (
    RECORD_ENV,
    TRAIN_FILES,
    Recorded,
    RecordingNet,
    flows_by_kind,
    records,
)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "tests.dist_worker:Recorded"
STEPS_PER_EPOCH, EPOCHS = 11, 2  # 42 samples in global batches of 4: 10 of 4, 1 of 2
STEPS = STEPS_PER_EPOCH * EPOCHS
TIMEOUT = 300  # seconds per launch: generous for a loaded 2-core machine, but bounded

Batches = list[list[str]]  # per step, the keys of a batch


# ---- launching ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(record: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", RECORD_ENV) and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        env[RECORD_ENV] = str(record)
    return env


def torchrun(*args: str, record: Path | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N ARGS`` on loopback, with a c10d rendezvous on a free port."""
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command += [f"--nproc-per-node={nproc}", "--nnodes=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.2",
                "--max-restarts=0", *args]
    return subprocess.run(command, cwd=ROOT, env=environment(record), capture_output=True,
                          text=True, timeout=TIMEOUT)


def flows_train(data: Path, directory: Path, *options: str, record: Path,
                ranks: int) -> subprocess.CompletedProcess:
    """``flows train`` the recorded recipe: under torchrun on ``ranks`` ranks, or a plain
    process for 1."""
    args = ["-m", "flows", "train", RECIPE, "--data-dir", str(data), "--checkpoint-dir",
            str(directory), "--checkpoint-every", "3", "--no-progress", *options]
    if ranks > 1:
        return torchrun(*args, record=record, nproc=ranks)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment(record),
                          capture_output=True, text=True, timeout=TIMEOUT)


def ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"


# ---- recorded samples -----------------------------------------------------------------------------
def recorded(folder: Path, ranks: int) -> list[Batches]:
    """Per rank, the keys of each training batch it ran, in order."""
    return [[json.loads(line) for line in (folder / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(ranks)]


def global_batches(per_rank: list[Batches]) -> Batches:
    """Rebuild the global batches: rank r of W held ``batch[r::W]``."""
    world = len(per_rank)
    assert len({len(batches) for batches in per_rank}) == 1, "ranks ran different batch counts"
    out = []
    for slices in zip(*per_rank, strict=True):
        batch: list[Any] = [None] * sum(len(s) for s in slices)
        for r, part in enumerate(slices):
            assert len(batch[r::world]) == len(part), "not a rank slice of one global batch"
            batch[r::world] = part
        out.append(batch)
    return out


def assert_each_epoch_is_the_dataset(steps: Batches) -> None:
    assert len(steps) % STEPS_PER_EPOCH == 0
    for start in range(0, len(steps), STEPS_PER_EPOCH):
        keys = [k for batch in steps[start:start + STEPS_PER_EPOCH] for k in batch]
        assert len(keys) == TRAIN_FILES and len(set(keys)) == TRAIN_FILES


def newest(directory: Path) -> dict:
    found = CheckpointManager(str(directory)).latest_valid()
    assert found is not None
    return found[1]


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Recorded.generate(tmp_path_factory.mktemp("recorded"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python -m tests.dist_worker`` on 2 ranks: loaders in lockstep, then an uninterrupted
    2-rank training run of the recorded recipe (batch size 2, global 4) from Python."""
    out = tmp_path_factory.mktemp("reference")
    ok(torchrun("-m", "tests.dist_worker", str(out), str(data), record=out / "record"))
    per_rank = recorded(out / "record", 2)
    return {"out": out, "per_rank": per_rank, "global": global_batches(per_rank),
            "results": [json.loads((out / f"result{r}.json").read_text()) for r in range(2)]}


@pytest.fixture(scope="module")
def killed(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``flows train`` on 2 ranks (batch size 2) killed by SIGKILL at step 7, mid-epoch 1: its
    newest checkpoint is step 6's."""
    out = tmp_path_factory.mktemp("killed")
    run = flows_train(data, out / "checkpoints", "--batch-size", "2", "--stop-after-steps", "7",
                      "--stop-signal", "SIGKILL", record=out / "record", ranks=2)
    assert run.returncode != 0, run.stderr[-3000:]
    state = newest(out / "checkpoints")
    assert state["step"] == 6
    return {"checkpoints": out / "checkpoints", "per_rank": recorded(out / "record", 2)}


# ---- tests ----------------------------------------------------------------------------------------
def test_loaders_under_torchrun_shard_each_epoch_once_with_equal_batch_counts(reference):
    """Real process group: rank 0 alone lists the files; the ranks' batches rebuild the global
    batches of a 1-rank flow with the global batch size (a last global batch with fewer samples
    than ranks dropped, with drop_last any short one); stratified, bucketed and mixed flows give
    every rank as many batches; after 3 batches every rank's loader state is the same."""
    parts = json.loads((reference["out"] / "loaders.json").read_text())
    assert [(p["rank"], p["world"]) for p in parts] == [(0, 2), (1, 2)]
    assert [p["listings"] for p in parts] == [1, 0]  # listed on rank 0, broadcast to rank 1
    assert [p["files"] for p in parts] == [TRAIN_FILES, TRAIN_FILES]
    base = Flow.items(records(41)).shuffle(seed=2)
    one_rank = {"fixed3": base.batch(6), "fixed3_drop_last": base.batch(6, drop_last=True),
                "fixed2": base.batch(4), "stratify": base.stratify("label", 8)}
    dropped = {"fixed3": 0, "fixed3_drop_last": 5, "fixed2": 1, "stratify": 1}
    for kind, flow in flows_by_kind().items():
        per_rank = [p["loaders"][kind]["epochs"] for p in parts]
        assert parts[0]["loaders"][kind]["state"] == parts[1]["loaders"][kind]["state"], kind
        simulated = flow.loader(rank=0, world_size=2), flow.loader(rank=1, world_size=2)
        single = one_rank[kind].loader(rank=0, world_size=1) if kind in one_rank else None
        for epoch in range(2):
            mine = [per_rank[r][epoch] for r in range(2)]
            assert len(mine[0]) == len(mine[1]) > 0, f"{kind}: unequal batch counts"
            assert mine == [[list(b["key"]) for b in ld] for ld in simulated], kind
            keys = [k for batches in mine for batch in batches for k in batch]
            assert len(keys) == len(set(keys)), f"{kind}: a sample twice in an epoch"
            if kind == "bucket":  # buckets with fewer samples than ranks are dropped
                assert 41 - len(keys) < 41 // 4
            if single is not None:  # the same epoch of the 1-rank flow
                whole = [list(b["key"]) for b in single]
                assert global_batches(mine) == whole[:len(mine[0])], kind
                assert 41 - len(keys) == dropped[kind], kind
                assert all(len(b) >= 2 for b in whole[:len(mine[0])])
                assert all(len(b) < 2 for b in whole[len(mine[0]):]) or kind.endswith("drop_last")
        for ld in (*simulated, single):
            if ld is not None:
                ld.close()


def test_train_from_python_under_torchrun_is_sharded_and_reduces_metrics(reference, data):
    """train() on 2 ranks: every epoch each rank runs 11 batches and together they see the
    dataset once; both ranks report the same metrics, summed over ranks: the eval accuracy
    and loss equal those of the final model over the whole eval set in one process."""
    per_rank = reference["per_rank"]
    assert [len(b) for b in per_rank] == [STEPS, STEPS]
    assert_each_epoch_is_the_dataset(reference["global"])
    results = reference["results"]
    assert results[0]["step"] == results[1]["step"] == STEPS
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["train_metrics"] == results[1]["train_metrics"]
    assert results[1]["checkpoint"] is None  # rank 0 writes the checkpoints
    final = newest(reference["out"] / "checkpoints")
    assert (final["step"], final["epoch"], final["world_size"]) == (STEPS, EPOCHS, 2)
    assert len(final["rng"]) == 2  # every rank's RNGs
    model = RecordingNet()
    model.load_state_dict(final["model"])
    model.eval()
    recipe = Recorded(Recorded.Config(data_dir=str(data), batch_size=100))
    with recipe.eval_flow().loader(rank=0, world_size=1) as loader:
        (batch,) = list(loader)
    with torch.no_grad():
        output = model({"audio": batch["audio"], "key": batch["key"]})
    accuracy = (output.argmax(-1) == batch["label"]).double().mean().item()  # float32 is inexact
    loss = F.cross_entropy(output, batch["label"]).item()
    assert results[0]["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert results[0]["metrics"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_killed_two_rank_run_resumed_on_two_ranks_continues_identically(reference, killed, data,
                                                                         tmp_path):
    """SIGKILL at step 7, resume from step 6 on 2 ranks: each rank trains on exactly the samples
    of the uninterrupted run, the parameters end bit-identical, and the epoch metrics (summed
    over ranks before and after the resume) are the uninterrupted run's."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(killed["checkpoints"], checkpoints)
    resumed = tmp_path / "record"
    ok(flows_train(data, checkpoints, "--batch-size", "2", "--resume", record=resumed, ranks=2))
    after = recorded(resumed, 2)
    for r in range(2):
        assert killed["per_rank"][r][:6] + after[r] == reference["per_rank"][r]
    final = newest(checkpoints)
    expected = newest(reference["out"] / "checkpoints")
    assert final["step"] == STEPS
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), f"parameter {name} differs"
    epoch_metrics = [[r for r in read_log(log) if r["kind"] == "epoch"]
                     for log in (reference["out"] / "metrics.jsonl", checkpoints / "metrics.jsonl")]
    for ours, theirs in zip(*epoch_metrics, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-9)


def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch(reference, killed, data,
                                                                           tmp_path):
    """Step 6 of the 2-rank run (batch 2 per rank) on 1 rank with batch size 4: the global order
    goes on exactly, epoch 1 is the dataset once. With batch size 2 (global 2) it is refused."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(killed["checkpoints"], checkpoints)
    with pytest.raises(FlowsError, match="same global batch size"):
        train(Recorded(Recorded.Config(data_dir=str(data), batch_size=2)),
              TrainConfig(checkpoint_dir=str(checkpoints), resume=True, progress=False))
    ok(flows_train(data, checkpoints, "--batch-size", "4", "--resume",
                   record=tmp_path / "record", ranks=1))
    (after,) = recorded(tmp_path / "record", 1)
    before = global_batches([batches[:6] for batches in killed["per_rank"]])
    assert before == reference["global"][:6]
    assert after == reference["global"][6:]
    assert_each_epoch_is_the_dataset(before + after)


def test_one_rank_checkpoint_resumes_on_two_ranks_with_the_same_global_batch(reference, data,
                                                                            tmp_path):
    """1 rank, --global-batch-size 4, SIGKILL at step 15 (newest checkpoint: step 12, mid-epoch
    2); resumed under torchrun on 2 ranks with --global-batch-size 4: the global sample order
    is the uninterrupted one, each epoch the dataset once."""
    checkpoints = tmp_path / "checkpoints"
    run = flows_train(data, checkpoints, "--global-batch-size", "4",
                      "--stop-after-steps", "15", record=tmp_path / "one", ranks=1)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert newest(checkpoints)["step"] == 12
    ok(flows_train(data, checkpoints, "--global-batch-size", "4", "--resume",
                   record=tmp_path / "two", ranks=2))
    (before,) = recorded(tmp_path / "one", 1)
    after = global_batches(recorded(tmp_path / "two", 2))
    assert before[:12] + after == reference["global"]
    assert_each_epoch_is_the_dataset(before[:12] + after)
    assert newest(checkpoints)["step"] == STEPS


def test_sigterm_stops_both_ranks_at_one_step_and_that_checkpoint_resumes_on_one_rank(
        reference, data, tmp_path):
    """SIGTERM (what torchrun forwards on preemption) on 2 ranks: the ranks agree to stop at
    the same step and rank 0 checkpoints it (mid-epoch 2) before any rank exits (torchrun stops
    the others once one exits); resumed on 1 rank with --global-batch-size 4, the global sample
    order is the uninterrupted one."""
    checkpoints = tmp_path / "checkpoints"
    run = flows_train(data, checkpoints, "--global-batch-size", "4", "--stop-after-steps", "16",
                      "--stop-signal", "SIGTERM", record=tmp_path / "two", ranks=2)
    assert run.returncode != 0 and "stopped by SIGTERM at step 16" in run.stderr, run.stderr[-3000:]
    stopped = newest(checkpoints)
    assert (stopped["step"], stopped["world_size"]) == (16, 2)
    ok(flows_train(data, checkpoints, "--global-batch-size", "4", "--resume",
                   record=tmp_path / "one", ranks=1))
    before = global_batches(recorded(tmp_path / "two", 2))
    (after,) = recorded(tmp_path / "one", 1)
    assert before + after == reference["global"]
