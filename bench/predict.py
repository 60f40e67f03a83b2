"""Throughput of `tfsearch predict` against today's `tfsearch evaluate` path on the same images.

    python bench/predict.py --profile cpu --images 32
    python bench/predict.py --profile paper --images 2      # ~30 s per image on 2 CPU cores

Both paths score the same test images of one category with a model at its final milestone (its weights as
initialised: throughput does not depend on training). `evaluate` is
`tfsearch.transfusion.evaluation.evaluate_run` on a training run that has a checkpoint but no maps yet: it
decodes the category (training images, foreground, test set), runs the reverse process at the profile's
inference batch, caches the maps and computes the metrics. `predict` is
`tfsearch.deploy.detector.run_prediction` on an export of that checkpoint: it checks and decodes the images,
runs the reverse process, fuses, and writes a TIFF map, an overlay PNG and scores.csv. Both are timed at batch
1 and 16 (at most the number of images), wall clock including their one-off costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tfsearch.data.demo import demo_root
from tfsearch.deploy.detector import run_prediction
from tfsearch.deploy.export import export_category
from tfsearch.deploy.selected import Selected
from tfsearch.transfusion.evaluation import evaluate_run
from tfsearch.transfusion.job import TrainJob
from tfsearch.transfusion.profiles import get_profile
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import Trainer

CATEGORY = "stripes"


def folder_dataset(root: Path, images: int) -> Path:
    """A `folder` dataset with the demo category's first `images` test images and 8 training images."""
    source = demo_root() / CATEGORY
    target = root / "data" / CATEGORY
    tests = sorted((source / "test").glob("*/*.png"))[:images]
    masks = [source / "ground_truth" / p.parent.name / f"{p.stem}_mask.png" for p in tests]
    train = sorted((source / "train" / "good").glob("*.png"))[:8]
    for path in [*tests, *train, *(mask for mask in masks if mask.is_file())]:
        relative = path.relative_to(source)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / relative)
    return root / "data"


def checkpointed_run(run_dir: Path, job: TrainJob) -> int:
    """A training run folder with a checkpoint at the final epoch and no maps; returns that epoch."""
    trainer = Trainer(job, run_dir, Runtime(device="cpu", progress=False))
    trainer.start(resume=False)
    trainer.epoch = job.profile.epochs
    trainer.save_checkpoint()
    return trainer.epoch


def measure(profile_name: str, images: int, batches: list[int], scratch: Path) -> list[dict]:
    data = folder_dataset(scratch, images)
    base = get_profile(profile_name)
    results = []
    for batch in batches:
        profile = base.replace(inference_batch=batch)
        job = TrainJob(dataset="folder", category=CATEGORY, profile=profile, data_root=data)
        run = scratch / f"run-{batch}"
        epoch = checkpointed_run(run / "train" / CATEGORY / "default", job)
        started = time.perf_counter()
        evaluate_run(run / "train" / CATEGORY / "default", runtime=Runtime(device="cpu", progress=False))
        evaluate_seconds = time.perf_counter() - started

        selected = Selected("folder", CATEGORY, "bench", "test", "image_auroc", "default", epoch,
                            profile.lam, profile.kernel, float("nan"), {})  # fmt: skip
        export = export_category(run, {"name": "bench"}, selected, scratch / f"export-{batch}")
        started = time.perf_counter()
        rows = run_prediction(
            export,
            [data / CATEGORY / "test"],
            scratch / f"predict-{batch}",
            runtime=Runtime(device="cpu", progress=False),
            batch_size=batch,
        )
        predict_seconds = time.perf_counter() - started
        results.append(
            {
                "profile": profile_name,
                "batch": batch,
                "images": len(rows),
                "evaluate_images_per_second": len(rows) / evaluate_seconds,
                "predict_images_per_second": len(rows) / predict_seconds,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=("cpu", "paper"))
    parser.add_argument("--images", type=int, default=32, help="test images scored by each path")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = sorted({min(int(b), args.images) for b in args.batches.split(",")})
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tfsearch-bench-predict-") as scratch:
        measure(args.profile, args.images, batches, Path(scratch))
    print(f"# load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
