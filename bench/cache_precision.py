"""How much the float16 map cache moves the metrics: float32 maps against the same maps rounded to float16.

    python -m bench.cache_precision                          # demo stripes and disk, cpu profile, 10 epochs
    python -m bench.cache_precision --categories nut --epochs 20

Trains each category (a real training run, `Trainer.fit`), then computes the raw maps of its test set in
float32 with the trained model, exactly as the trainer does before it rounds them for the cache, and prints
every metric at the profile's λ for n = 1 and n = 7 from both, with the largest difference in points
(1 point = 0.01 of a metric).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from tfsearch.data.demo import demo_root
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import METRIC_NAMES, GroundTruth, evaluate
from tfsearch.transfusion.inference import anomaly_maps
from tfsearch.transfusion.job import TrainJob
from tfsearch.transfusion.profiles import get_profile
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import Trainer


def compare(category: str, epochs: int, folder: Path) -> float:
    profile = get_profile("cpu").with_epochs(epochs)
    job = TrainJob(
        dataset="demo", category=category, profile=profile, data_root=demo_root(), milestones=(epochs,)
    )
    trainer = Trainer(job, folder / category, Runtime(progress=False))
    trainer.start(resume=False)
    trainer.fit()
    test = trainer._ensure_data().eval_sets["test"]
    m_disc, m_recon = anomaly_maps(
        trainer.model, trainer.process, test.images, batch_size=profile.inference_batch, device=trainer.device
    )
    truth = GroundTruth.from_masks(test.masks)
    worst = 0.0
    for kernel in (1, 7):
        exact = evaluate(truth, fuse(m_disc, m_recon, profile.lam, kernel))
        cached = evaluate(
            truth, fuse(m_disc.astype(np.float16), m_recon.astype(np.float16), profile.lam, kernel)
        )
        for name in METRIC_NAMES:
            diff = 100 * abs(exact[name] - cached[name])
            worst = max(worst, diff)
            print(f"{category:8} n={kernel} {name:13} float32 {100 * exact[name]:9.4f}  float16"
                  f" {100 * cached[name]:9.4f}  diff {diff:.5f} points")  # fmt: skip
    small = np.abs(m_disc[~test.masks]) < 6.1e-5
    print(f"{category:8} normal pixels of M_disc below float16's normal range (6.1e-5): {small.mean():.1%}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", default="stripes,disk")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tfsearch-bench-precision-") as folder:
        worst = max(compare(c, args.epochs, Path(folder)) for c in args.categories.split(","))
    print(f"largest difference: {worst:.5f} points (threshold 0.01); load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
