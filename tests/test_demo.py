"""``flows demo`` end to end on the YESNO recipe (two epochs instead of three): real
subprocesses, a real SIGKILL mid-epoch, and a bit-identical result."""

from __future__ import annotations

import re

from flows.training.checkpoint import CheckpointManager
from flows.training.cli import main


def test_demo_kills_resumes_and_matches_bit_for_bit(capsys, tmp_path):
    assert main(["demo", "--recipe", "recipes.yesno:YesNo", "--epochs", "2",
                 "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  training   the reference \((\d+) steps\) and the run to kill at step "
                     r"(\d+), side by side \(two subprocesses\) \.\.\.\n", out), out
    for progress in re.findall(r"\n  \.\.\.  .*", out):  # every 5 s while the runs train
        assert re.fullmatch(r"\n  \.\.\. +(reference|resumed run) at step \d+/\d+.* \(\d+ s\)", progress)
    killed = re.search(r"killed +by SIGKILL at step (\d+) \(epoch 2, step (\d+) of (\d+)\); "
                       r"newest checkpoint: step (\d+)", out)
    assert killed is not None, out
    kill_at, in_epoch, per_epoch, newest = map(int, killed.groups())
    assert 1 < in_epoch < per_epoch and newest < kill_at  # mid-epoch; some steps are redone
    assert f"\n  resuming   from step {newest} with 0 workers ...\n" in out
    assert f"resumed    from step {newest} with 0 workers, ran to step {2 * per_epoch}" in out
    assert "resumed parameters are bit-identical to the uninterrupted run's" in out
    assert (tmp_path / "data" / "waves_yesno").is_dir()
    for run in ("reference", "interrupted"):
        newest_url = CheckpointManager(str(tmp_path / run)).list()[0]
        assert newest_url.endswith(f"ckpt-{2 * per_epoch:010d}.pt")
