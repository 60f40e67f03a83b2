"""What a training run is and where it lives: the job (everything that determines the run, stored as
job.json and compared on resume) and the run folder (`TrainDir`):

    RUN_DIR/job.json                    the resolved job (dataset, category, profile, milestones, ...)
    RUN_DIR/history.csv                 one row per epoch: losses, learning rate, images/s
    RUN_DIR/checkpoints/epoch-0040/     model.pt: the network's weights (every milestone; export reads them)
                                        trainer.pt: model, optimiser, LR schedule, epoch, RNG states
                                        (the latest milestone only: resuming needs no other)
    RUN_DIR/maps/test/epoch-0040/       raw M_disc / M_recon of every test image (tfsearch.maps.cache)
    RUN_DIR/maps/val/epoch-0040/        the same for the selection data, when the job has some"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tfsearch.errors import InputError
from tfsearch.maps.cache import map_set_exists
from tfsearch.store.run_folder import maps_folder, read_state
from tfsearch.transfusion.profiles import Profile

CHECKPOINT_FILE = "trainer.pt"  # the whole training state, kept at the latest milestone only
MODEL_FILE = "model.pt"  # the network's weights, kept at every milestone
# the key of a training run's model.pt (and trainer.pt) that holds the model's state dict
MODEL_STATE_KEY = "model"
VALIDATION_KINDS = ("none", "synthetic", "folder")


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
    # selection data: "none", "synthetic" (held-out good images plus the same images with validation
    # anomalies unlike training's, see `validation_anomalies`; the held-out images are the dataset's own
    # validation split where it has one, MVTec AD 2's validation/good, else a share of the training images)
    # or "folder" (the test split of CATEGORY in `val_root`, MVTec layout)
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
        payload = read_state(self.job_file, "the training run's job")
        try:
            return TrainJob.from_dict(payload)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{self.job_file}: damaged: not a training job ({exc!r})") from None
