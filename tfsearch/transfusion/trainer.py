"""Training one TransFusion model for one category, with a checkpoint and a map cache at every milestone
(the run folder's layout: `tfsearch.transfusion.job`).

Training to the largest milestone passes through all the smaller ones, so a search over epochs pays for
one training run per category (architecture.md, principle 1). A run resumed from any checkpoint is
bit-identical on the CPU to one that never stopped: every random draw comes from one seeded generator saved
in the checkpoint.
"""

from __future__ import annotations

import csv
import io
import math
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, map_set_exists, write_map_set
from tfsearch.store.atomic import atomic_write, atomic_write_json, atomic_write_text
from tfsearch.transfusion.augment import rotate_where
from tfsearch.transfusion.inference import anomaly_maps, to_signed
from tfsearch.transfusion.job import CHECKPOINT_FILE, MODEL_FILE, TrainDir, TrainJob
from tfsearch.transfusion.protocol import paper_protocol_note
from tfsearch.transfusion.runtime import PRECISIONS, Runtime, use_tf32
from tfsearch.transfusion.synthesis import AnomalySynthesizer
from tfsearch.transfusion.training_data import PreparedData, prepare_data
from tfsearch.transfusion.transparency import TransparencyProcess, training_loss
from tfsearch.transfusion.unet import TransFusionUNet


@dataclass
class Milestone:
    """What a finished milestone hands to its listener (the search reports it to Ray Tune)."""

    epoch: int
    checkpoint: Path
    maps: list[Path]
    loss: float
    images_per_second: float


@contextmanager
def named_if_damaged(path: Path) -> Iterator[None]:
    """A training state that cannot be loaded is InputError naming its file, not torch's traceback (whose
    advice, `weights_only=False`, would run whatever the file holds)."""
    try:
        yield
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot be loaded ({reason}); the file may be damaged") from None


class Trainer:
    """Owns the model, optimiser, schedule and generator of one run; `fit` trains to the last milestone."""

    def __init__(self, job: TrainJob, run_dir: Path, runtime: Runtime | None = None) -> None:
        self.job, self.runtime, self.dir = job, runtime or Runtime(), TrainDir(run_dir)
        self.profile = job.profile
        self.milestones = job.resolved_milestones()
        if self.runtime.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {PRECISIONS}, got {self.runtime.precision!r}")
        self.device = self.runtime.torch_device()
        self.runtime.compile_check(self.device)
        self.precision = self.runtime.network_precision(self.profile, self.device)
        use_tf32(self.precision, self.device)
        self.process = TransparencyProcess(self.profile.steps)

        torch.manual_seed(self.profile.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.profile.seed)
        self.model = TransFusionUNet(self.profile).to(self.device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # training runs `network`; states and weights are the plain module's (no `_orig_mod.` in their keys)
        self.network = torch.compile(self.model) if self.runtime.compile else self.model
        # one fused kernel per step instead of a loop over the parameters (4x faster on the CPU profile's
        # network: bench/results/compile.md)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.profile.lr,
            weight_decay=self.profile.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=self.profile.lr_step_epochs, gamma=self.profile.lr_gamma
        )
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.data: PreparedData | None = None
        self.synthesizer = None

    # --- state
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])

    def save_checkpoint(self) -> Path:
        """The whole training state, then the milestone's weights; then the training state of every earlier
        milestone goes (its weights stay): the optimiser's moments are twice the model, at every milestone.
        In this order a milestone with model.pt can always be resumed, and a crash between the two files
        leaves the weights in trainer.pt, which is then kept."""
        folder = self.dir.checkpoint(self.epoch)
        for name, state in (
            (CHECKPOINT_FILE, self.state()),
            (MODEL_FILE, {"model": self.model.state_dict(), "epoch": self.epoch}),
        ):
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write(folder / name, lambda handle, data=buffer: handle.write(data.getbuffer()))
        for epoch in self.dir.checkpoint_epochs():
            earlier = self.dir.checkpoint(epoch)
            if epoch < self.epoch and (earlier / MODEL_FILE).exists():
                (earlier / CHECKPOINT_FILE).unlink()
        return folder

    def load_checkpoint(self, epoch: int) -> None:
        """Continue from the whole training state saved at milestone `epoch`."""
        path = self.dir.checkpoint(epoch) / CHECKPOINT_FILE
        with named_if_damaged(path):
            self.load_state(torch.load(path, map_location=self.device, weights_only=True))

    def load_weights(self, epoch: int) -> None:
        """The network as it was at milestone `epoch` (to compute its maps); the rest of the state is kept."""
        path = self.dir.weights(epoch)
        with named_if_damaged(path):
            self.model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True)["model"])

    # --- setup
    def start(self, resume: bool) -> None:
        """Create the run folder, or continue it; a finished or foreign run is never overwritten."""
        job_dict = self.job.to_dict()
        if self.dir.job_file.exists():
            if not resume:
                raise InputError(
                    f"{self.dir.root} already holds a training run; pass --resume to continue it"
                )
            stored = self.dir.load_job().to_dict()
            changed = sorted(k for k in job_dict if job_dict[k] != stored[k])
            if changed:
                raise InputError(f"--resume: {self.dir.job_file} differs from this job in {changed}")
            # a crash between a checkpoint and its maps: recompute the maps from the weights, never retrain
            for epoch in self.dir.weight_epochs():
                if epoch in self.milestones and not self.has_maps(epoch):
                    self.load_weights(epoch)
                    self.write_maps(epoch)
            done = self.dir.checkpoint_epochs()
            if done:
                self.load_checkpoint(done[-1])
        else:
            atomic_write_json(self.dir.job_file, job_dict)
        # `tfsearch train` and every training trial of `tfsearch run` start here: the console and the trial's
        # log say when the paper profile does not train as the paper did
        note = paper_protocol_note(job_dict)
        if note:
            job = f"{self.job.dataset}/{self.job.category}"
            print(f"[train] {job} warning: {note}", file=sys.stderr, flush=True)

    def _ensure_data(self) -> PreparedData:
        if self.data is None:
            self.data = prepare_data(self.job, self.device, self.runtime.loader_workers)
            self.synthesizer = AnomalySynthesizer(
                self.profile.image_size, self.data.texture_bank, self.profile.subtle_share
            )
        return self.data

    # --- training
    def train_step(self, x0: torch.Tensor, foreground: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch of normal images in [−1,1] (method.md §12, TRAIN); its loss terms
        stay on the device: nothing in a step waits for the device, so a GPU never idles between steps."""
        profile, process, gen = self.profile, self.process, self.generator
        batch = x0.shape[0]
        t = process.sample_timesteps(batch, self.device, gen)

        # the first ⌊B/2⌋ samples (1 when B = 1) get a synthetic anomaly; the rest stay clean
        anomalous = max(1, batch // 2)
        noise = torch.zeros_like(x0)
        mask = torch.zeros_like(x0[:, :1])
        sim_mask = torch.zeros_like(mask)
        synthetic = self.synthesizer(x0[:anomalous], foreground[:anomalous], generator=gen)
        noise[:anomalous], mask[:anomalous], sim_mask[:anomalous] = (
            synthetic.noise,
            synthetic.mask,
            synthetic.sim_mask,
        )
        # the reverse process always starts from an empty mask
        sim_mask = sim_mask.masked_fill((t == process.last).view(-1, 1, 1, 1), 0)

        x_t = process.compose(x0, noise, mask, t)

        rotated = torch.rand(batch, device=self.device, generator=gen) < profile.rotation_prob
        angles = (torch.rand(batch, device=self.device, generator=gen) * 2 - 1) * profile.rotation_degrees
        stack = torch.cat([x_t, x0, noise, mask, sim_mask], dim=1)
        stack = rotate_where(stack, rotated, angles, mode="nearest")
        x_t, x0, noise, mask, sim_mask = stack.split([3, 3, 3, 1, 1], dim=1)

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            output = self.network(x_t, sim_mask, t)
        terms = training_loss(process, output, x_t, x0, noise, mask, t, profile.focal_weight)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if profile.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), profile.grad_clip)
        self.optimizer.step()
        return terms.detached()

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training images; the loss terms are summed on the device (in float64, as the
        host summed them) and read back once, at the end."""
        data = self._ensure_data()
        self.model.train()
        count = data.train_images.shape[0]
        order = torch.randperm(count, device=self.device, generator=self.generator)
        started = time.perf_counter()
        sums: torch.Tensor | None = None
        batches = 0
        for begin in range(0, count, self.profile.batch_size):
            index = order[begin : begin + self.profile.batch_size]
            terms = self.train_step(to_signed(data.train_images[index]), data.foreground[index])
            step = torch.stack(list(terms.values())).double()
            sums = step if sums is None else sums + step
            batches += 1
        means = dict(zip(terms, (sums / batches).tolist(), strict=True))
        seconds = time.perf_counter() - started
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.epoch += 1
        row = {"epoch": self.epoch, "lr": lr, "seconds": seconds, "images_per_second": count / seconds}
        row.update({f"loss_{name}": value for name, value in means.items()})
        self.history.append(row)
        return row

    def write_history(self) -> None:
        if not self.history:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(self.history[0]))
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.dir.history_file, out.getvalue())

    # --- inference
    def write_maps(self, epoch: int) -> list[Path]:
        """Run the reverse process on every evaluation image (test, and val if any) and cache the maps."""
        data = self._ensure_data()
        written = []
        for split, eval_set in data.eval_sets.items():
            m_disc, m_recon = anomaly_maps(
                self.model,
                self.process,
                eval_set.images,
                batch_size=self.profile.inference_batch,
                device=self.device,
                precision=self.precision,
            )
            target = self.dir.maps(epoch, split)
            meta = {
                "dataset": self.job.dataset,
                "category": data.category.name,
                "epoch": epoch,
                "split": split,
                "image_size": self.profile.image_size,
                "data_root": str(self.job.data_root) if self.job.data_root else None,
                "mask_paths": eval_set.mask_paths,
                "profile": self.profile.name,
            }
            maps = MapSet(
                m_disc=m_disc,
                m_recon=m_recon,
                masks=eval_set.masks,
                labels=eval_set.labels,
                image_ids=eval_set.image_ids,
                meta=meta,
            )
            write_map_set(target, maps)
            written.append(target)
        return written

    def has_maps(self, epoch: int) -> bool:
        splits = ("test", "val") if self.job.validation != "none" else ("test",)
        return all(map_set_exists(self.dir.maps(epoch, split)) for split in splits)

    # --- fit
    def fit(self, on_milestone: Callable[[Milestone], bool | None] | None = None) -> list[Milestone]:
        """Train to the last milestone; at each one save a checkpoint, write maps and tell the listener,
        which ends training there by returning True (`--patience`: the milestone is complete by then)."""
        reached: list[Milestone] = []
        last = self.milestones[-1]
        bar = tqdm(
            total=last,
            initial=self.epoch,
            desc=f"{self.job.dataset}/{self.job.category}",
            unit="epoch",
            disable=not self.runtime.progress,
        )
        while self.epoch < last:
            row = self.train_epoch()
            if not math.isfinite(row["loss_total"]):
                kept = self.dir.checkpoint_epochs()
                profile = self.profile
                raise InputError(
                    f"{self.job.dataset}/{self.job.category}: training diverged (loss {row['loss_total']})"
                    f" at epoch {self.epoch}, profile {profile.name!r} at lr {profile.lr:g} and "
                    f"{profile.image_size} px: lower the learning rate (last milestone kept: "
                    f"{kept[-1] if kept else 'none'})"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss_total']:.4f}", img_s=f"{row['images_per_second']:.1f}")
            if self.epoch in self.milestones:
                checkpoint = self.save_checkpoint()
                self.write_history()
                maps = self.write_maps(self.epoch)
                milestone = Milestone(
                    self.epoch, checkpoint, maps, row["loss_total"], row["images_per_second"]
                )
                reached.append(milestone)
                if on_milestone is not None and on_milestone(milestone):
                    break
        bar.close()
        self.write_history()
        return reached


def train(
    job: TrainJob,
    run_dir: Path,
    runtime: Runtime | None = None,
    resume: bool = False,
    on_milestone: Callable[[Milestone], None] | None = None,
) -> Trainer:
    """Train (or continue) one category to its last milestone."""
    trainer = Trainer(job, run_dir, runtime)
    trainer.start(resume)
    trainer.fit(on_milestone)
    return trainer
