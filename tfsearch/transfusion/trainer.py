"""Training one TransFusion model for one category, with a checkpoint and a map cache at every milestone.

A training run lives in one folder (`TrainDir`):

    RUN_DIR/job.json                    the resolved job (dataset, category, profile, milestones, ...)
    RUN_DIR/history.csv                 one row per epoch: losses, learning rate, images/s
    RUN_DIR/checkpoints/epoch-0040/     model.pt: the network's weights (every milestone; export reads them)
                                        trainer.pt: model, optimiser, LR schedule, epoch, RNG states
                                        (the latest milestone only: resuming needs no other)
    RUN_DIR/maps/test/epoch-0040/       raw M_disc / M_recon of every test image (tfsearch.maps.cache)
    RUN_DIR/maps/val/epoch-0040/        the same for the selection data, when the job has some

Training to the largest milestone passes through all the smaller ones, so a search over epochs pays for
one training run per category (architecture.md, principle 1). A run resumed from any checkpoint is
bit-identical on the CPU to one that never stopped: every random draw comes from one seeded generator saved
in the checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tfsearch.data import datasets
from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, map_set_exists, write_map_set
from tfsearch.store.atomic import atomic_write, atomic_write_json, atomic_write_text
from tfsearch.store.run_folder import maps_folder
from tfsearch.transfusion.inference import anomaly_maps, to_signed
from tfsearch.transfusion.profiles import PAPER_PROFILE, PROFILES, QUICK_PROFILE, Profile, get_profile
from tfsearch.transfusion.protocol import paper_protocol_note
from tfsearch.transfusion.synthesis import (
    AnomalySynthesizer,
    foreground_masks,
    load_texture_bank,
    rotate,
    validation_anomalies,
)
from tfsearch.transfusion.transparency import TransparencyProcess, training_loss
from tfsearch.transfusion.unet import TransFusionUNet

PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_FILE = "trainer.pt"  # the whole training state, kept at the latest milestone only
MODEL_FILE = "model.pt"  # the network's weights, kept at every milestone


@dataclass(frozen=True)
class TrainJob:
    """Everything that determines a training run; stored as `job.json` and compared on resume."""

    dataset: str
    category: str
    profile: Profile
    data_root: Path | None = None
    milestones: tuple[int, ...] = ()  # empty: the profile's grid
    texture_root: Path | None = None
    fg_root: Path | None = None
    restrict_to_foreground: bool = True
    # selection data: "none", "synthetic" (held-out good training images plus the same images with validation
    # anomalies unlike training's, see `validation_anomalies`) or "folder" (the test split of CATEGORY in
    # `val_root`, MVTec layout)
    validation: str = "none"
    val_root: Path | None = None
    val_fraction: float = 0.1

    def resolved_milestones(self) -> tuple[int, ...]:
        milestones = tuple(sorted(set(self.milestones))) or self.profile.milestones()
        if milestones[0] < 1 or milestones[-1] > self.profile.epochs:
            raise InputError(
                f"milestones {list(milestones)} must lie in 1..{self.profile.epochs} (the profile's epochs)"
            )
        return milestones if milestones[-1] == self.profile.epochs else (*milestones, self.profile.epochs)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "category": self.category,
            "profile": self.profile.to_dict(),
            "data_root": str(self.data_root) if self.data_root else None,
            "milestones": list(self.resolved_milestones()),
            "texture_root": str(self.texture_root) if self.texture_root else None,
            "fg_root": str(self.fg_root) if self.fg_root else None,
            "restrict_to_foreground": self.restrict_to_foreground,
            "validation": self.validation,
            "val_root": str(self.val_root) if self.val_root else None,
            "val_fraction": self.val_fraction,
        }

    @classmethod
    def from_dict(cls, payload: dict) -> TrainJob:
        return cls(
            dataset=payload["dataset"],
            category=payload["category"],
            profile=Profile.from_dict(payload["profile"]),
            data_root=Path(payload["data_root"]) if payload["data_root"] else None,
            milestones=tuple(payload["milestones"]),
            texture_root=Path(payload["texture_root"]) if payload["texture_root"] else None,
            fg_root=Path(payload["fg_root"]) if payload["fg_root"] else None,
            restrict_to_foreground=payload["restrict_to_foreground"],
            validation=payload.get("validation", "none"),
            val_root=Path(payload["val_root"]) if payload.get("val_root") else None,
            val_fraction=payload.get("val_fraction", 0.1),
        )


@dataclass(frozen=True)
class Runtime:
    """How a job runs; none of it changes the result on a given device."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (as `Profile.bf16` says) | fp32 | bf16 (autocast the network)
    loader_workers: int = 0  # threads that decode images once at start
    progress: bool = True
    channels_last: bool = False  # NHWC convolutions: faster with bf16 on recent CPUs and on GPUs

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: CUDA is not available on this machine")
        return device

    def network_precision(self, profile: Profile, device: torch.device) -> str:
        """fp32 or bf16: as asked, or with `auto` bf16 where the profile asks for it and the device computes
        bfloat16 natively (emulated, it is slower than fp32)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if profile.bf16 and native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or
    AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return device.type == "cpu" and any(getattr(torch.cpu, check, lambda: False)() for check in checks)


class TrainDir:
    """Paths inside a training run folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.job_file = self.root / "job.json"
        self.history_file = self.root / "history.csv"

    def checkpoint(self, epoch: int) -> Path:
        """A folder per milestone, so that Ray Tune can persist it as a `Checkpoint`."""
        return self.root / "checkpoints" / f"epoch-{epoch:04d}"

    def maps(self, epoch: int, split: str = "test") -> Path:
        return maps_folder(self.root, epoch, split)

    def _epochs_with(self, name: str) -> list[int]:
        folder = self.root / "checkpoints"
        return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob(f"epoch-*/{name}"))

    def checkpoint_epochs(self) -> list[int]:
        """Milestones whose whole training state is kept (the latest; every one in runs before model.pt)."""
        return self._epochs_with(CHECKPOINT_FILE)

    def weight_epochs(self) -> list[int]:
        """Milestones whose network weights are kept: every milestone reached."""
        return sorted(set(self._epochs_with(MODEL_FILE)) | set(self.checkpoint_epochs()))

    def weights(self, epoch: int) -> Path:
        """The file holding the weights of milestone `epoch` under the key "model" (a run written before
        model.pt existed has them only in trainer.pt)."""
        folder = self.checkpoint(epoch)
        return folder / MODEL_FILE if (folder / MODEL_FILE).exists() else folder / CHECKPOINT_FILE

    def map_epochs(self, split: str = "test") -> list[int]:
        folder = self.root / "maps" / split
        return sorted(int(p.name.split("-")[1]) for p in folder.glob("epoch-*") if map_set_exists(p))

    def load_job(self) -> TrainJob:
        if not self.job_file.is_file():
            raise InputError(f"{self.root} is not a training run: {self.job_file} is missing")
        return TrainJob.from_dict(json.loads(self.job_file.read_text()))


@dataclass
class Milestone:
    """What a finished milestone hands to its listener (the search reports it to Ray Tune)."""

    epoch: int
    checkpoint: Path
    maps: list[Path]
    loss: float
    images_per_second: float


@dataclass
class EvalSet:
    """Images whose maps are written at every milestone, with their ground truth."""

    images: torch.Tensor  # uint8 (N,3,H,W) on the CPU
    masks: np.ndarray  # bool (N,H,W)
    labels: np.ndarray  # int8 (N,)
    image_ids: list[str]
    mask_paths: list[str | None]

    @classmethod
    def from_samples(cls, samples: tuple[datasets.Sample, ...], size: int, workers: int) -> EvalSet:
        images = datasets.load_images(samples, size, workers=workers)
        return cls(
            images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            masks=datasets.load_masks(samples, size),
            labels=np.array([s.label for s in samples], dtype=np.int8),
            image_ids=[s.image_id for s in samples],
            mask_paths=[str(s.mask) if s.mask else None for s in samples],
        )


@dataclass
class PreparedData:
    category: datasets.Category
    train_images: torch.Tensor  # uint8 (N,3,H,W) on the training device
    foreground: torch.Tensor  # float {0,1} (N,1,H,W) on the training device
    foreground_source: str
    eval_sets: dict[str, EvalSet]  # "test", and "val" when the job has selection data
    texture_bank: torch.Tensor | None = None


VALIDATION_KINDS = ("none", "synthetic", "folder")


def held_out(count: int, fraction: float, seed: int) -> torch.Tensor:
    """Indices of the good training images kept out of training for synthetic validation."""
    keep = max(2, round(count * fraction))
    if keep >= count:
        raise InputError(f"only {count} training images: too few to hold out {keep} for --select-on val")
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + 1))[:keep].sort().values


def synthetic_validation(
    images: torch.Tensor, foreground: torch.Tensor, ids: list[str], seed: int
) -> EvalSet:
    """Held-out good images plus the same images with a validation anomaly and its mask: smaller, fainter
    and from other sources than the training generator's (`validation_anomalies`), so that candidates differ.

    Drawn on the CPU from a fixed generator, so the set is the same on every device and at every milestone."""
    generator = torch.Generator().manual_seed(seed + 2)
    defective, mask = validation_anomalies(to_signed(images), foreground, generator)
    as_uint8 = ((defective + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    masks = mask[:, 0].bool().numpy()
    count = images.shape[0]
    return EvalSet(
        images=torch.cat([images, as_uint8]),
        masks=np.concatenate([np.zeros_like(masks), masks]),
        labels=np.concatenate([np.zeros(count, np.int8), masks.reshape(count, -1).any(1).astype(np.int8)]),
        image_ids=[i.replace("train/", "val/", 1) for i in ids]
        + [i.replace("train/good/", "val/synthetic/", 1) for i in ids],
        mask_paths=[None] * (2 * count),
    )


def prepare_data(job: TrainJob, device: torch.device, workers: int = 0) -> PreparedData:
    """Decode the category once and keep it in memory (train set on the device): no per-epoch loader."""
    if job.validation not in VALIDATION_KINDS:
        raise InputError(f"validation must be one of {VALIDATION_KINDS}, got {job.validation!r}")
    size = job.profile.image_size
    category = datasets.load_category(job.dataset, job.data_root, job.category)
    train = datasets.load_images(category.train, size, workers=workers)
    ids = [s.image_id for s in category.train]
    if job.restrict_to_foreground:
        fg, fg_source = foreground_masks(
            train, is_texture=category.is_texture, fg_root=job.fg_root, category=category.name, image_ids=ids
        )
    else:
        fg, fg_source = np.ones(train.shape[:3], dtype=bool), "whole image (--no-foreground)"
    train_images = torch.from_numpy(train).permute(0, 3, 1, 2).contiguous()
    foreground = torch.from_numpy(fg).float()[:, None]
    eval_sets = {"test": EvalSet.from_samples(category.test, size, workers)}
    bank = load_texture_bank(job.texture_root, size) if job.texture_root else None
    if job.validation == "synthetic":
        val = held_out(len(ids), job.val_fraction, job.profile.seed)
        kept = torch.ones(len(ids), dtype=torch.bool)
        kept[val] = False
        eval_sets["val"] = synthetic_validation(
            train_images[val], foreground[val], [ids[i] for i in val.tolist()], job.profile.seed
        )
        train_images, foreground = train_images[kept], foreground[kept]
    elif job.validation == "folder":
        if job.val_root is None:
            raise InputError("--val-root is required for validation from a folder")
        val_category = datasets.load_category("folder", job.val_root, job.category)
        eval_sets["val"] = EvalSet.from_samples(val_category.test, size, workers)
    return PreparedData(
        category=category,
        train_images=train_images.to(device),
        foreground=foreground.to(device),
        foreground_source=fg_source,
        eval_sets=eval_sets,
        texture_bank=bank.to(device) if bank is not None else None,
    )


class Trainer:
    """Owns the model, optimiser, schedule and generator of one run; `fit` trains to the last milestone."""

    def __init__(self, job: TrainJob, run_dir: Path, runtime: Runtime | None = None) -> None:
        self.job, self.runtime, self.dir = job, runtime or Runtime(), TrainDir(run_dir)
        self.profile = job.profile
        self.milestones = job.resolved_milestones()
        if self.runtime.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {PRECISIONS}, got {self.runtime.precision!r}")
        self.device = self.runtime.torch_device()
        self.precision = self.runtime.network_precision(self.profile, self.device)
        self.process = TransparencyProcess(self.profile.steps)

        torch.manual_seed(self.profile.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.profile.seed)
        self.model = TransFusionUNet(self.profile).to(self.device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.profile.lr, weight_decay=self.profile.weight_decay
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
        self.load_state(torch.load(path, map_location=self.device, weights_only=True))

    def load_weights(self, epoch: int) -> None:
        """The network as it was at milestone `epoch` (to compute its maps); the rest of the state is kept."""
        state = torch.load(self.dir.weights(epoch), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])

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
    def train_step(self, x0: torch.Tensor, foreground: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch of normal images in [−1,1] (method.md §12, TRAIN)."""
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
        sim_mask[t == process.last] = 0  # the reverse process always starts from an empty mask

        x_t = process.compose(x0, noise, mask, t)

        rotated = torch.rand(batch, device=self.device, generator=gen) < profile.rotation_prob
        angles = (torch.rand(batch, device=self.device, generator=gen) * 2 - 1) * profile.rotation_degrees
        if rotated.any():
            stack = torch.cat([x_t, x0, noise, mask, sim_mask], dim=1)
            stack[rotated] = rotate(stack[rotated], angles[rotated], mode="nearest")
            x_t, x0, noise, mask, sim_mask = stack.split([3, 3, 3, 1, 1], dim=1)

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            output = self.model(x_t, sim_mask, t)
        terms = training_loss(process, output, x_t, x0, noise, mask, t, profile.focal_weight)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if profile.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), profile.grad_clip)
        self.optimizer.step()
        return terms.as_floats()

    def train_epoch(self) -> dict[str, float]:
        data = self._ensure_data()
        self.model.train()
        count = data.train_images.shape[0]
        order = torch.randperm(count, device=self.device, generator=self.generator)
        started = time.perf_counter()
        sums: dict[str, float] = {}
        batches = 0
        for begin in range(0, count, self.profile.batch_size):
            index = order[begin : begin + self.profile.batch_size]
            terms = self.train_step(to_signed(data.train_images[index]), data.foreground[index])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            batches += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.epoch += 1
        row = {"epoch": self.epoch, "lr": lr, "seconds": seconds, "images_per_second": count / seconds}
        row.update({f"loss_{name}": value / batches for name, value in sums.items()})
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
    def fit(self, on_milestone: Callable[[Milestone], None] | None = None) -> list[Milestone]:
        """Train to the last milestone; at each one save a checkpoint, write maps and tell the listener."""
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
                if on_milestone is not None:
                    on_milestone(milestone)
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


# ------------------------------------------------------------------------------------------------- CLI
def add_runtime_arguments(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocasts the network; auto: bf16 where the profile asks for it and the device has it",
    )
    parser.add_argument("--loader-workers", type=int, default=0, help="threads decoding the images at start")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions (faster with bf16)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train one category, with checkpoints and maps at milestones"
    )
    datasets.add_data_arguments(parser, multiple=False)
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help=f"training profile (default: {PAPER_PROFILE} on a CUDA device, else {QUICK_PROFILE};"
        " on --resume, the run's)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    parser.add_argument(
        "--epochs", type=int, help="override the profile's epochs (the LR drop moves proportionally)"
    )
    parser.add_argument("--milestones", help="comma-separated milestone epochs (default: the profile's grid)")
    parser.add_argument(
        "--texture-root", type=Path, help="DTD-layout folder of texture images (root/class/*.jpg)"
    )
    parser.add_argument("--fg-root", type=Path, help="foreground masks: ROOT/CATEGORY/train/good/<name>.png")
    parser.add_argument(
        "--no-foreground", action="store_true", help="place anomalies anywhere, also on object categories"
    )
    parser.add_argument(
        "--validation",
        choices=VALIDATION_KINDS,
        default="none",
        help="also write maps of selection data at milestones: held-out good images + synthetic anomalies "
        "(synthetic) or the test split of --val-root (folder)",
    )
    parser.add_argument(
        "--val-root", type=Path, help="MVTec-layout folder holding CATEGORY/test for validation"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run_train)


def parse_milestones(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--milestones expects comma-separated epochs like 10,20,40, got {text!r}") from None


def default_profile(device: torch.device) -> str:
    """The profile of `tfsearch train` without --profile: the paper's where it can train (a CUDA device),
    else the quick one, which trains in minutes on a CPU."""
    return PAPER_PROFILE if device.type == "cuda" else QUICK_PROFILE


def chosen_profile(args, device: torch.device) -> str:
    """--profile, else the profile of the run being resumed, else `default_profile`; says which it took."""
    if args.profile is not None:
        return args.profile
    stored = TrainDir(args.out)
    if args.resume and stored.job_file.is_file():
        name = stored.load_job().profile.name
        print(f"[train] profile {name!r}: the run's in {args.out} (no --profile)", flush=True)
        return name
    name = default_profile(device)
    quick = "" if device.type == "cuda" else ", not a CUDA device: the quick profile"
    why = f"training on {device}{quick}"
    print(f"[train] profile {name!r}: {why} (no --profile)", flush=True)
    return name


def run_train(args) -> int:
    if args.category is None:
        raise InputError("--category is required for tfsearch train")
    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be a positive number of epochs, got {args.epochs}")
    runtime = Runtime(args.device, args.precision, args.loader_workers, not args.quiet, args.channels_last)
    profile = get_profile(chosen_profile(args, runtime.torch_device()))
    if args.epochs:
        profile = profile.with_epochs(args.epochs)
    category = datasets.resolve_categories(args.dataset, args.data_root, args.category, None)[0]
    job = TrainJob(
        dataset=args.dataset,
        category=category,
        profile=profile,
        data_root=args.data_root,
        milestones=parse_milestones(args.milestones),
        texture_root=args.texture_root,
        fg_root=args.fg_root,
        restrict_to_foreground=not args.no_foreground,
        validation=args.validation,
        val_root=args.val_root,
    )
    started = time.perf_counter()
    trainer = train(job, args.out, runtime, resume=args.resume)
    data = trainer.data
    print(
        f"trained {job.dataset}/{category} to epoch {trainer.epoch} in {time.perf_counter() - started:.1f} s "
        f"on {trainer.device} ({platform.processor() or platform.machine()}); "
        f"foreground: {data.foreground_source if data else 'not loaded'}; run folder: {args.out}"
    )
    return 0
