"""Lightning ``Trainer.fit`` on a flows loader, run by tests/test_trainers.py as a subprocess.

    python tests/lightning_run.py OUT killed STEP        # checkpoints every 3 steps, waits after STEP
    python tests/lightning_run.py OUT resume CKPT ...    # an uninterrupted fit, then one per checkpoint

Each fit logs its batches' keys (one line per batch) to OUT/<name>.batches, saves the final
weights to OUT/<name>.pt and its checkpoints under OUT/<name>/. The killed run stops after
STEP's checkpoint and waits to be killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from trainer_flow import train_flow

EPOCHS, EVERY = 2, 3


class Model(L.LightningModule):
    def __init__(self, log: Path, block_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.log_path, self.block_after = log, block_after

    def training_step(self, batch, batch_idx):
        with self.log_path.open("a") as f:
            f.write(" ".join(batch["key"]) + "\n")
        return torch.nn.functional.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"].float())

    def on_train_batch_end(self, outputs, batch, batch_idx):  # after ModelCheckpoint's save
        if self.global_step == self.block_after:
            print("blocked", flush=True)
            sys.stdin.read()  # until killed

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(out: Path, name: str, ckpt_path: str | None = None, block_after: int | None = None) -> None:
    model = Model(out / f"{name}.batches", block_after)
    checkpoints = ModelCheckpoint(dirpath=out / name, filename="{step}", every_n_train_steps=EVERY,
                                  save_top_k=-1)
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoints])
    with train_flow().loader(num_workers=2) as loader:  # a flows.Loader, handed over as it is
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    torch.save(model.net.state_dict(), out / f"{name}.pt")


def main(argv: list[str]) -> None:
    out, mode, rest = Path(argv[0]), argv[1], argv[2:]
    if mode == "killed":
        fit(out, "killed", block_after=int(rest[0]))
    else:
        fit(out, "reference")
        for ckpt in rest:
            fit(out, f"resumed-{Path(ckpt).stem}", ckpt_path=ckpt)


if __name__ == "__main__":
    main(sys.argv[1:])
