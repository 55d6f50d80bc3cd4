"""The ``flows`` command: train (options from the config dataclasses), inspect, bench, and one
clear line for every mistake."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.training.checkpoint import CheckpointManager
from flows.training.cli import main
from flows.training.metrics_log import read_log
from recipes.synthetic import make_yesno
from tests.test_train import ROOT, Tiny

TINY = "tests.test_train:Tiny"
YESNO = "recipes.yesno:YesNo"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Tiny.generate(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def yesno_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("yesno")
    make_yesno(root, n_files=12)
    return root


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help and usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["train", "nosuchrecipe"], 1, "unknown recipe 'nosuchrecipe'; known recipes:"),
    (["train", TINY], 1, f"recipe 'tiny' needs --data-dir; {Tiny.data_hint}"),
    (["train", TINY, "--data-dir", "/no/such/dir"], 1,
     f"data directory /no/such/dir does not exist; {Tiny.data_hint}"),
    (["inspect", TINY, "--data-dir", "/no/such/dir"], 1, "does not exist"),
    (["train", TINY, "--epochs", "many"], 2, "argument --epochs: invalid int value: 'many'"),
    (["train", TINY, "--task", "dance"], 2, "argument --task: invalid choice: 'dance'"),
    (["train", TINY, "--storage-options", "{oops"], 2, "argument --storage-options: not JSON"),
    (["bench", "tests.test_train:Nothing"], 1, "cannot load recipe"),
    (["fly"], 2, "invalid choice: 'fly'"),
])
def test_mistakes_get_one_clear_line(capsys, argv, code, message):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_values_get_one_clear_line(capsys, tiny_data, tmp_path):
    code, _, err = run(capsys, "train", TINY, "--data-dir", str(tiny_data), "--epochs", "0",
                       "--checkpoint-dir", str(tmp_path))
    assert code == 1 and err.strip() == "flows: error: epochs must be at least 1, got 0"


def test_options_come_from_the_config_dataclasses(capsys):
    code, out, _ = run(capsys, "train", TINY, "--help")
    assert code == 0
    for option in ("--data-dir", "--batch-size", "--task {classify,sequence,regress,multi}",
                   "--checkpoint-every", "--resume, --no-resume", "--grad-clip", "--amp",
                   "--on-error {raise,skip}"):
        assert option in out


def test_train_resume_and_warn_about_a_corrupt_checkpoint(capsys, tiny_data, tmp_path):
    common = ["train", TINY, "--data-dir", str(tiny_data), "--checkpoint-dir", str(tmp_path),
              "--no-progress", "--log-path", str(tmp_path / "log.csv")]
    code, out, err = run(capsys, *common, "--epochs", "1", "--checkpoint-every", "4")
    assert code == 0 and "tiny: step 10, epoch 1:" in out and "epoch 1/1 (step 10)" in err
    urls = CheckpointManager(str(tmp_path)).list()
    Path(urls[0]).write_bytes(b"FLOWS-CKPT")  # the newest, cut short
    code, out, err = run(capsys, *common, "--epochs", "2", "--resume", "--plot",
                         str(tmp_path / "curves.png"))
    assert code == 0 and "tiny: step 20, epoch 2:" in out
    assert f"flows: warning: skipping checkpoint {urls[0]}" in err
    assert f"resumed from {urls[1]} (step 8, epoch 0)" in err
    assert [r["step"] for r in read_log(tmp_path / "log.csv") if r["kind"] == "step"] == \
        list(range(1, 21))
    assert (tmp_path / "curves.png").exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_data, tmp_path):
    """``python -m flows``, sent SIGTERM at step 3: one last checkpoint, exit 128 + 15."""
    done = subprocess.run(
        [sys.executable, "-m", "flows", "train", TINY, "--data-dir", str(tiny_data),
         "--checkpoint-dir", str(tmp_path), "--stop-after-steps", "3", "--stop-signal", "SIGTERM"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "stopped by SIGTERM at step 3" in done.stderr and "Traceback" not in done.stderr
    assert CheckpointManager(str(tmp_path)).list()[0].endswith("ckpt-0000000003.pt")


def test_inspect_counts_classes_and_plots(capsys, yesno_data, tmp_path):
    code, out, _ = run(capsys, "inspect", YESNO, "--data-dir", str(yesno_data), "--out",
                       str(tmp_path))
    assert code == 0
    assert "train: 10 samples" in out and "eval: 2 samples" in out
    assert "labels: no: " in out and "  yes: " in out  # the recipe's class names
    assert "sample rates: 8000 Hz: 10" in out and "channels: 1: 10" in out
    assert "duration: min 5." in out
    for png in ("classes.png", "histograms.png", "waveforms.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_times_each_stage_then_prints_the_loader_stats(capsys, yesno_data, tmp_path):
    trace = tmp_path / "trace.json"
    code, out, _ = run(capsys, "bench", YESNO, "--data-dir", str(yesno_data), "--samples", "4",
                       "--num-workers", "1", "--trace", str(trace))
    assert code == 0
    ablation, loader = out.split("\ntrain loader, 1 worker(s), 1 epoch(s), per node:\n")
    rows = [line.split()[0] for line in ablation.splitlines()[2:]]
    assert rows[0] == "source" and rows[-1] == "batch"
    assert {"read", "decode_audio", "resample"} <= set(rows)
    nodes = [line.split()[0] for line in loader.splitlines()[2:] if line[:1].isalpha()]
    assert nodes[0] == "source" and {"read", "decode_audio", "collate"} <= set(nodes)
    assert "queue workers: ready" in loader and "\nbottleneck: " in loader
    events = json.loads(trace.read_text())["traceEvents"]
    assert {"read", "decode_audio", "first batch"} <= {e["name"] for e in events}
