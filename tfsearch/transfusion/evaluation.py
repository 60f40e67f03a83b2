"""`tfsearch evaluate RUN_DIR`: the paper's metrics and MVTec AD 2's (`EXTENDED_METRIC_NAMES`: AU-PRO to FPR
0.05 and SegF1 beside the paper's five) of a trained run at one milestone, λ and n, and image and pixel AUROC
per defect kind (the test folders), which a mean over kinds hides.

SegF1 binarises the test maps at the threshold of `tfsearch.maps.segmentation.milestone_seg_threshold`: set
on the milestone's validation maps when the run has them, never on test labels then; only a run without
validation maps (the oracle protocol) sets it on the test set's own normal images. `seg_threshold` says which.

The raw maps come from the run's map cache; a milestone whose checkpoint exists but whose maps do not gets
them computed once (and cached) from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tfsearch.data.datasets import defect_kind
from tfsearch.errors import InputError
from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import MapFuser
from tfsearch.maps.metrics import EXTENDED_METRIC_NAMES, GroundTruth, evaluate, per_kind
from tfsearch.maps.segmentation import milestone_seg_threshold
from tfsearch.transfusion.job import TrainDir
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import Trainer


def milestone_maps(run_dir: Path, epoch: int | None = None, runtime: Runtime | None = None) -> Path:
    """The map-cache folder of `epoch` (default: the last milestone with weights or maps)."""
    train_dir = TrainDir(run_dir)
    job = train_dir.load_job()
    with_maps = train_dir.map_epochs()
    available = sorted(set(with_maps) | set(train_dir.weight_epochs()))
    if not available:
        raise InputError(f"{run_dir} has no finished milestone yet (no weights and no maps)")
    epoch = available[-1] if epoch is None else epoch
    if epoch not in available:
        raise InputError(f"--epoch {epoch}: {run_dir} has milestones {available}")
    if epoch not in with_maps:
        trainer = Trainer(job, run_dir, runtime or Runtime(progress=False))
        trainer.load_weights(epoch)
        trainer.write_maps(epoch)
    return train_dir.maps(epoch)


def evaluate_run(
    run_dir: Path,
    epoch: int | None = None,
    lam: float | None = None,
    kernel: int | None = None,
    runtime: Runtime | None = None,
) -> dict[str, object]:
    """Metrics of one (epoch, λ, n) configuration of a training run; λ and n default to the profile's.
    `per_kind` holds each defect kind's image and pixel AUROC (`tfsearch.maps.metrics.per_kind`);
    `seg_threshold` SegF1's threshold and what set it (`milestone_seg_threshold`: value, rule, split,
    normal_images)."""
    job = TrainDir(run_dir).load_job()
    lam = job.profile.lam if lam is None else lam
    kernel = job.profile.kernel if kernel is None else kernel
    maps_dir = milestone_maps(run_dir, epoch, runtime)
    maps = read_map_set(maps_dir)
    fused = MapFuser(maps.m_disc, maps.m_recon).fuse(lam, kernel)
    threshold = milestone_seg_threshold(maps_dir, lam, kernel)
    metrics = evaluate(GroundTruth.from_masks(maps.masks), fused, seg_threshold=threshold["value"])
    return {
        "dataset": job.dataset,
        "category": job.category,
        "epoch": int(maps.meta["epoch"]),
        "lam": lam,
        "kernel": kernel,
        "images": len(maps.image_ids),
        "anomalous": int(maps.labels.sum()),
        **{name: metrics[name] for name in EXTENDED_METRIC_NAMES},
        "seg_threshold": threshold,
        "per_kind": per_kind(maps.masks, fused, [defect_kind(i) for i in maps.image_ids]),
    }
