"""Checkpoint storage of one category's training run at a profile's milestone grid, before and after.

    python -m bench.checkpoint_storage --profile paper

Measures the bytes of the two files a milestone can hold, written by the real `Trainer` (the profile's network
and an AdamW whose moments exist, as after the first step): `model.pt` (the weights) and `trainer.pt` (the
whole training state). Then, per category:

- before: `trainer.pt` at every milestone in the training folder, each also handed to Ray Tune, which
  uploaded it a second time into the trial's folder (keeping the last one);
- after: `model.pt` at every milestone, `trainer.pt` at the latest only, each milestone uploaded once.
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
from pathlib import Path

import torch

from tfsearch.transfusion.job import TrainJob
from tfsearch.transfusion.profiles import get_profile
from tfsearch.transfusion.trainer import Trainer


def saved_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="paper")
    args = parser.parse_args()
    profile = get_profile(args.profile)
    with tempfile.TemporaryDirectory() as scratch:
        # the data are never read: only the network, the optimiser and the state they make
        trainer = Trainer(TrainJob(dataset="demo", category="stripes", profile=profile), Path(scratch))
        for parameter in trainer.model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        trainer.optimizer.step()  # AdamW's two moments per parameter now exist, as at any milestone
        weights = saved_bytes({"model": trainer.model.state_dict(), "epoch": 0})
        state = saved_bytes(trainer.state())
    milestones = len(profile.milestones())
    before_stored = milestones * state + state
    before_uploaded = 2 * milestones * state
    after_stored = milestones * weights + state
    after_uploaded = milestones * (weights + state)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    mb, gb = 1e6, 1e9
    print(f"machine: {platform.node()} ({platform.machine()}), torch {torch.__version__}")
    print(f"profile {profile.name}: {parameters / 1e6:.1f} M parameters, {milestones} milestones")
    print(f"model.pt {weights / mb:.1f} MB, trainer.pt {state / mb:.1f} MB")
    print(f"before: stored {before_stored / gb:.2f} GB, uploaded {before_uploaded / gb:.2f} GB per category")
    print(f"after:  stored {after_stored / gb:.2f} GB, uploaded {after_uploaded / gb:.2f} GB per category")
    print(
        f"stored {before_stored / after_stored:.2f}x less,"
        f" uploaded {before_uploaded / after_uploaded:.2f}x less"
    )


if __name__ == "__main__":
    main()
