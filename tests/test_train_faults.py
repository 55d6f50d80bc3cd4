"""The training loop on a bad day: a non-finite loss or weights, absent files skipped and
counted, a checkpoint directory that cannot be written, a torn metrics log, a stop signal at an
evaluation, a stray file among the checkpoints. Each ends in one clear line, an exact count, or
an exact continuation (real subprocesses, real signals, a real moto S3 server)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from flows.errors import FlowsError
from flows.training.checkpoint import CheckpointManager, CheckpointWarning
from flows.training.cli import main
from flows.training.metrics_log import read_log
from flows.training.recipe import make_config
from flows.training.train import train
from recipes.table import TableRecipe
from tests.s3server import free_port, s3_storage_options
from tests.test_train import (
    EPOCHS,
    PER_EPOCH,
    Tiny,
    assert_same_parameters,
    cli_train,
    newest,
    quiet,
    recipe,
)

TINY = "tests.test_train:Tiny"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Tiny.generate(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    """An uninterrupted run: its parameters and its metrics log (eval every 3 steps)."""
    log = tmp_path_factory.mktemp("reference") / "metrics.jsonl"
    result = train(recipe(data), quiet(log_path=str(log), eval_every=3))
    assert (result.step, result.interrupted) == (EPOCHS * PER_EPOCH, None)
    return result.model.state_dict(), read_log(log)


def untimed(records: list[dict]) -> list[dict]:
    """Log records without their one timing-dependent field."""
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- 6: non-finite loss and weights ---------------------------------------------------------
def test_a_non_finite_loss_stops_naming_the_batch_before_any_bad_checkpoint(tmp_path):
    """One training file holds finite values so large that the forward pass overflows: training
    stops with one line naming the batch's samples; every checkpoint written holds finite
    weights, and none is written at or after that step."""
    data = Tiny.generate(tmp_path / "data")
    bad = sorted((data / "train").iterdir())[13]
    torch.save(torch.full((1, 16), 3e38), bad)  # finite, but no float32 sum of them is
    run = cli_train(data, tmp_path / "run", "--checkpoint-every", "1", "--log-path",
                    str(tmp_path / "metrics.jsonl"))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("flows: error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0] and bad.name in errors[0]
    failed_at = int(re.search(r"at step (\d+)", errors[0]).group(1))  # type: ignore[union-attr]
    manager = CheckpointManager(str(tmp_path / "run"), keep=100)
    steps = [manager.load(url)["step"] for url in manager.list()]
    assert steps and max(steps) == failed_at - 1  # checkpoint_every 1, keep 3: the last ones
    for url in manager.list():
        assert all(torch.isfinite(t).all() for t in manager.load(url)["model"].values())
    losses = [r["loss"] for r in read_log(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert len(losses) == failed_at - 1 and all(abs(x) < float("inf") for x in losses)


class Kinked(Tiny):
    """Tiny whose output is scaled by ``1 + sqrt(s**2)`` with ``s = 0``: the loss is finite,
    but the gradient of ``s`` is 0/0 = NaN, so the first optimizer step makes ``s`` NaN."""

    def model(self) -> torch.nn.Module:
        return _Kinked(super().model())


class _Kinked(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.s = net, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * (1 + torch.sqrt(self.s**2))


def test_non_finite_weights_are_never_checkpointed(data, tmp_path):
    """Every loss finite, but a NaN gradient makes a weight NaN at step 1: the checkpoint due
    then is refused with one message naming the weight, and nothing is written."""
    kinked = Kinked(make_config(Kinked, data_dir=str(data)))
    with pytest.raises(FlowsError, match=r"^step 1: non-finite weights \(s\) though every loss"):
        train(kinked, quiet(checkpoint_dir=str(tmp_path), checkpoint_every=1))
    assert CheckpointManager(str(tmp_path)).list() == []


# ---- 9: --on-error skip from the CLI -------------------------------------------------------
def test_a_table_with_absent_files_trains_with_on_error_skip_and_counts_them(capsys, tmp_path):
    """A partial download: 5 of the table's 16 training files and 1 of its 4 evaluation files
    are absent. ``--on-error skip`` trains on the rest and reports exactly 5 (and 1) per epoch,
    10 in all after 2 epochs."""
    root = TableRecipe.generate(tmp_path / "data", clips_per_fold=2)
    meta = pd.read_csv(root / "metadata.csv")
    train_rows, eval_rows = meta[meta.split == "train"], meta[meta.split == "test"]
    for path in [*train_rows.path[::3][:5], eval_rows.path.iloc[0]]:
        (root / path).unlink()
    common = ["train", "table", "--data-dir", str(root), "--split-column", "split", "--seconds",
              "1", "--batch-size", "4", "--epochs", "2", "--no-progress", "--checkpoint-dir",
              str(tmp_path / "run")]
    code, out, err = run_cli(capsys, *common, "--on-error", "skip")
    assert code == 0, err
    assert err.count("| skipped 5 training, 1 evaluation samples") == 2
    assert "skipped 10 training samples in all, 1 in the last evaluation" in out
    log = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in log if r["kind"] == "epoch"] == [5, 5]
    assert [r["skipped"] for r in log if r["kind"] == "eval"] == [1, 1]


# ---- 10: checkpoint directory problems at start --------------------------------------------
@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot write into: read-only permissions, or for root (whom
    permissions do not stop) the immutable attribute."""
    directory = tmp_path / "locked"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode:
        pytest.skip("running as root without chattr +i: no way to make a directory unwritable")
    yield directory
    subprocess.run(["chattr", "-i", str(directory)], check=True)


def _start_fails_in_one_line(capsys, data, checkpoint_dir: str, message: str, *options: str):
    code, out, err = run_cli(capsys, "train", TINY, "--data-dir", str(data), "--no-progress",
                             "--checkpoint-dir", checkpoint_dir, *options)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.splitlines() == [f"flows: error: checkpoint directory {checkpoint_dir} {message}"]


def test_an_unwritable_checkpoint_directory_fails_at_start(capsys, data, unwritable):
    _start_fails_in_one_line(capsys, data, str(unwritable / "run"),
                             "cannot be written: Permission denied" if os.geteuid() else
                             "cannot be written: Operation not permitted")


def test_a_file_as_checkpoint_directory_fails_at_start(capsys, data, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    _start_fails_in_one_line(capsys, data, str(tmp_path / "run"), "is a file, not a directory")
    _start_fails_in_one_line(capsys, data, str(tmp_path / "run" / "sub"),
                             "cannot be written: Not a directory")


def test_a_missing_s3_bucket_fails_at_start(capsys, data, s3_options, s3_server):
    _start_fails_in_one_line(capsys, data, "s3://no-such-bucket/run",
                             "cannot be written: The specified bucket does not exist",
                             "--checkpoint-storage-options", json.dumps(s3_options))


def test_an_unreachable_s3_endpoint_fails_at_start(capsys, data, s3_server):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = s3_storage_options(closed)
    code, out, err = run_cli(capsys, "train", TINY, "--data-dir", str(data), "--no-progress",
                             "--checkpoint-dir", "s3://bucket/run",
                             "--checkpoint-storage-options", json.dumps(options))
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("flows: error: checkpoint directory s3://bucket/run cannot be written: "
                          f"Could not connect to the endpoint URL: \"{closed}/bucket/run/")


def test_a_writable_s3_directory_passes_the_check_and_leaves_nothing(s3_bucket, s3_options):
    manager = CheckpointManager(f"{s3_bucket}/checked", storage_options=s3_options)
    manager.check()
    manager.fs.invalidate_cache()
    assert manager.fs.find(manager.root) == []


# ---- 11: a torn metrics log ----------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_torn_last_line_in_the_metrics_log_does_not_block_resume(data, reference, tmp_path,
                                                                   suffix):
    """Stopped at step 5, the log's last line is then cut in the middle (as by a crash during
    the write): resuming drops that line with a warning and ends bit-identical."""
    log = tmp_path / f"metrics.{suffix}"
    options = dict(checkpoint_dir=str(tmp_path / "run"), log_path=str(log), eval_every=3)
    stopped = train(recipe(data), quiet(stop_after_steps=5, stop_signal="SIGTERM", **options))
    assert stopped.interrupted == "SIGTERM"
    text = log.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    log.write_text(text[: len(text) - len(last) // 2 - 1])  # a torn last line, no newline
    with pytest.warns(UserWarning, match=f"metrics log {re.escape(str(log))}: dropping its last"):
        done = train(recipe(data), quiet(resume=True, **options))
    assert done.resumed_from == stopped.checkpoint
    assert_same_parameters(done.model.state_dict(), reference[0])
    steps = [r["step"] for r in read_log(log) if r["kind"] == "step"]
    torn = {5} if suffix == "jsonl" else set()  # CSV: only step 5's last metric row was torn
    assert steps == [s for s in range(1, EPOCHS * PER_EPOCH + 1) if s not in torn]


def test_a_damaged_line_inside_the_log_is_one_error_naming_it(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "step", "step": 1, "epoch": 1, "loss": 1.0}\n{"kind": "st\n'
                   '{"kind": "step", "step": 2, "epoch": 1, "loss": 0.5}\n')
    with pytest.raises(FlowsError, match=rf"metrics log {re.escape(str(log))}, line 2: not a rec"):
        read_log(log)


# ---- 12: a stop signal at an evaluation ----------------------------------------------------
def test_sigterm_at_an_epoch_end_runs_the_pending_evaluation_on_resume(data, reference, tmp_path):
    """``python -m flows train`` sends itself SIGTERM at step 10, the end of epoch 1: the
    console does not show an old evaluation as this one, the checkpoint records the evaluation
    as pending, and the resumed run does it first, at step 10; the log and the parameters then
    equal an uninterrupted run's."""
    log = tmp_path / "metrics.jsonl"
    options = ["--log-path", str(log), "--eval-every", "3"]
    run = cli_train(data, tmp_path / "run", "--stop-after-steps", "10", "--stop-signal",
                    "SIGTERM", *options)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert "epoch 1/3 (step 10): train loss" in run.stderr
    assert "| eval pending (the stop cut it short; it runs on --resume)" in run.stderr
    assert newest(tmp_path / "run")["pending_eval"] == 1
    run = cli_train(data, tmp_path / "run", "--resume", *options)
    assert run.returncode == 0, run.stderr
    expected = next(r for r in reference[1] if r["kind"] == "eval" and r["step"] == 10)
    scores = "  ".join(f"{k} {expected[k]:.4g}" for k in ("loss", "accuracy"))
    assert f"epoch 1/3 (step 10): eval {scores} (pending since the stop)" in run.stderr
    assert untimed(read_log(log)) == untimed(reference[1])
    final = newest(tmp_path / "run")
    assert final["pending_eval"] is None
    assert_same_parameters(final["model"], reference[0])


def test_sigterm_at_a_mid_epoch_evaluation_and_again_during_it(data, reference, tmp_path):
    """SIGTERM at step 6 (an eval_every step): pending. The resumed run is stopped by SIGINT
    during that evaluation: still pending. The next resume does it, then trains on, and the
    log and parameters equal an uninterrupted run's."""
    log = tmp_path / "metrics.jsonl"
    options = dict(checkpoint_dir=str(tmp_path / "run"), log_path=str(log), eval_every=3)
    stopped = train(recipe(data), quiet(stop_after_steps=6, stop_signal="SIGTERM", **options))
    assert (stopped.interrupted, stopped.step, stopped.metrics) == ("SIGTERM", 6, {})
    assert newest(tmp_path / "run")["pending_eval"] == 1
    eval_recipe = recipe(data)
    flow = eval_recipe.eval_flow

    def interrupted_flow():  # the first eval batch delivers a real SIGINT
        return flow().map(_SignalOnce(signal.SIGINT))

    eval_recipe.eval_flow = interrupted_flow  # type: ignore[method-assign]
    again = train(eval_recipe, quiet(resume=True, **options))
    assert (again.interrupted, again.step) == ("SIGINT", 6)
    assert newest(tmp_path / "run")["pending_eval"] == 1
    done = train(recipe(data), quiet(resume=True, **options))
    assert done.interrupted is None
    assert untimed(read_log(log)) == untimed(reference[1])
    assert_same_parameters(done.model.state_dict(), reference[0])


class _SignalOnce:
    """A stage that sends this process ``signum`` at its first sample."""

    name = "signal"

    def __init__(self, signum: int):
        self.signum, self.sent = signum, False

    def __call__(self, item: dict) -> dict:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return item


# ---- 14: strays among the checkpoints ------------------------------------------------------
def test_a_stray_checkpoint_name_takes_no_keep_slot_and_is_never_resumed(data, reference,
                                                                         tmp_path):
    """``ckpt-9999999999.pt`` that flows did not write (junk, and a renamed copy of a real one)
    is ignored with a warning: training keeps its 2 newest real checkpoints, resumes from the
    real newest, and leaves the strays alone."""
    directory = tmp_path / "run"
    first = train(recipe(data), quiet(checkpoint_dir=str(directory), keep=2, max_steps=12,
                                      checkpoint_every=3))
    (directory / "ckpt-9999999999.pt").write_bytes(b"not a checkpoint at all")
    shutil.copy(first.checkpoint, directory / "ckpt-9999999998.pt")  # a real one, renamed
    with pytest.warns(CheckpointWarning, match="ignoring .*ckpt-999999999[89].pt: not a "
                                               "checkpoint flows wrote") as record:
        done = train(recipe(data), quiet(checkpoint_dir=str(directory), keep=2, resume=True,
                                         checkpoint_every=3))
    assert len([w for w in record if "ignoring" in str(w.message)]) == 2  # once each
    assert done.resumed_from == first.checkpoint
    assert_same_parameters(done.model.state_dict(), reference[0])
    assert sorted(p.name for p in directory.glob("ckpt-*.pt")) == [
        "ckpt-0000000027.pt", "ckpt-0000000030.pt", "ckpt-9999999998.pt", "ckpt-9999999999.pt"]
