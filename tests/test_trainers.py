"""Real trainers on flows, resumed after a SIGKILL: Lightning (a flows.Loader handed to
``Trainer.fit``) and HF accelerate (a StatefulDataLoader over ``flow.dataset()``)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.testing import run_epochs
from tests.trainer_flow import train_flow

HERE = Path(__file__).parent


def run_killed(script: str, out: Path, *args: str) -> None:
    """Run ``script`` until it prints ``blocked`` (after its checkpoints), then SIGKILL it."""
    child = subprocess.Popen([sys.executable, str(HERE / script), str(out), "killed", *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "blocked":
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run ended before it was killed"


def run(script: str, out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(HERE / script), str(out), *args], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)


def batches(path: Path) -> list[str]:
    return path.read_text().splitlines()


def assert_resumed_exactly(out: Path, name: str, step: int) -> None:
    """The uninterrupted run trained on the flow's two epochs; the resumed run's batches are its
    batches from ``step`` on, and the final weights are equal."""
    reference = batches(out / "reference.batches")
    assert reference == [" ".join(b["key"]) for b in run_epochs(train_flow().loader(), 2)]
    assert batches(out / f"{name}.batches") == reference[step:], name
    ours, theirs = torch.load(out / f"{name}.pt"), torch.load(out / "reference.pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"{name}: weights differ"


def test_lightning_resumes_a_killed_fit_exactly(tmp_path):
    pytest.importorskip("lightning")
    run_killed("lightning_run.py", tmp_path, "10")  # checkpoints at steps 3, 6, 9 of 12
    assert len(batches(tmp_path / "killed.batches")) == 10
    # mid-epoch, the epoch's end, mid next epoch (6 batches an epoch)
    points = [3, 6, 9]
    checkpoints = [str(tmp_path / "killed" / f"step={step}.ckpt") for step in points]
    run("lightning_run.py", tmp_path, "resume", *checkpoints)
    for step in points:
        assert_resumed_exactly(tmp_path, f"resumed-step={step}", step)


def test_accelerate_resumes_a_killed_run_exactly(tmp_path):
    pytest.importorskip("accelerate")
    run_killed("accelerate_run.py", tmp_path, "10")  # save_state at steps 3 and 9 of 12
    assert len(batches(tmp_path / "killed.batches")) == 10
    run("accelerate_run.py", tmp_path, "reference")
    for step in (3, 9):  # mid-epoch, and mid next epoch (6 batches an epoch)
        run("accelerate_run.py", tmp_path, "resume", str(tmp_path / f"step={step}"))
        assert_resumed_exactly(tmp_path, f"resumed-step={step}", step)
