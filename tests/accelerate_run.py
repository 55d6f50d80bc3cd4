"""HF accelerate with a StatefulDataLoader over ``flow.dataset()``, run by tests/test_trainers.py
as a subprocess.

    python tests/accelerate_run.py OUT killed STEP    # save_state at steps 3 and 9, waits after STEP
    python tests/accelerate_run.py OUT reference      # uninterrupted
    python tests/accelerate_run.py OUT resume DIR     # load_state(DIR), then on to the end

Each run logs its batches' keys (one line per batch) to OUT/<name>.batches and saves the final
weights to OUT/<name>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader
from trainer_flow import train_flow

EPOCHS, SAVE_AT = 2, (3, 9)  # 6 batches an epoch: mid-epoch, and mid next epoch


class Progress:
    """The loop's own counters, checkpointed with the rest."""

    def __init__(self) -> None:
        self.epoch = self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]


def main(out: Path, mode: str, arg: str | None = None) -> None:
    config = DataLoaderConfiguration(use_stateful_dataloader=True, dispatch_batches=False)
    accelerator = Accelerator(cpu=True, dataloader_config=config)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(train_flow().dataset(), batch_size=None, num_workers=2)  # flows batches
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    name = mode
    if mode == "resume":
        assert arg is not None
        accelerator.load_state(arg)
        name = f"resumed-{Path(arg).name}"
    with (out / f"{name}.batches").open("a") as log:
        while progress.epoch < EPOCHS:
            loader.set_epoch(progress.epoch)  # accelerate does not save its own epoch count
            for batch in loader:
                log.write(" ".join(batch["key"]) + "\n")
                log.flush()
                loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"].float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                progress.step += 1
                if mode == "killed" and progress.step in SAVE_AT:
                    accelerator.save_state(str(out / f"step={progress.step}"))
                if mode == "killed" and progress.step == int(arg or 0):
                    print("blocked", flush=True)
                    sys.stdin.read()  # until killed
            progress.epoch += 1
    torch.save(accelerator.unwrap_model(model).state_dict(), out / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
