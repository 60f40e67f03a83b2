"""Ablation of the quick profile on the realistic demo: what a small TransFusion needs to find subtle defects.

    python -m bench.ablation                                    # every variant on cork, fibre and marble
    python -m bench.ablation --categories marble --variants cpu,size128,textures+epochs120

Each variant is the cpu profile (64 px, 16 channels, 40 epochs, lr 1e-3) with some fields changed
(`VARIANTS`), or with real-photograph-like anomaly sources: `textures` gives the anomaly synthesiser, in
place of the procedural textures, a DTD-layout folder made of the good training images of the realistic
demo's other categories; `a+b` combines variants. Every (variant, category) trains from scratch on
`--dataset demo_real` (seed 0) with one milestone, the last epoch, then is scored at the profile's default λ
and n, and at λ = 1 (the discriminative map alone) and λ = 0 (the reconstruction map alone: whether that
branch carries any signal at this size). It prints one row per (variant, category): image and pixel AUROC,
image AUROC per defect kind, the two single-branch image AUROCs, and the training wall time.
`bench/patch_gaussian.py` is the classical anchor on the same images.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from tfsearch.config import get_profile
from tfsearch.demo import realistic_demo_root
from tfsearch.demo_real import REALISTIC_CATEGORIES
from tfsearch.evaluate import evaluate_run
from tfsearch.train import Runtime, TrainJob, train

# profile fields changed from the cpu profile, per variant (`textures` changes the anomaly source instead)
VARIANTS: dict[str, dict[str, object]] = {
    "cpu": {},
    "size128": {"image_size": 128},
    "width32": {"base_channels": 32},
    "lr3e-4": {"lr": 3e-4},
    "epochs120": {"epochs": 120, "lr_step_epochs": 90},
    "steps10": {"steps": 10},
    "textures": {},
}


def texture_folder(root: Path, category: str) -> Path:
    """A DTD-layout folder (`<class>/*.jpg`) of the good training images of the other categories."""
    folder = root / f"textures-{category}"
    for other in REALISTIC_CATEGORIES:
        if other == category:
            continue
        (folder / other).mkdir(parents=True, exist_ok=True)
        for path in sorted((realistic_demo_root() / other / "train" / "good").glob("*.png")):
            Image.open(path).convert("RGB").save(folder / other / f"{path.stem}.jpg", quality=95)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", default=",".join(REALISTIC_CATEGORIES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted({part for variant in variants for part in variant.split("+")} - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"# {machine}, load {os.getloadavg()[0]:.1f}")
    print(
        "| variant | category | image AUROC | pixel AUROC | per kind | λ=1 (disc) | λ=0 (recon) | train s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tfsearch-ablation-") as folder:
        root = Path(folder)
        for variant in variants:
            for category in args.categories.split(","):
                parts = variant.split("+")
                fields = {k: v for part in parts for k, v in VARIANTS[part].items()}
                profile = get_profile("cpu", milestone_every=10_000, **fields)
                textures = texture_folder(root, category) if "textures" in parts else None
                job = TrainJob("demo_real", category, profile, texture_root=textures)
                run_dir = root / f"{variant}-{category}"
                started = time.perf_counter()
                train(job, run_dir, Runtime(device="cpu", progress=False))
                seconds = time.perf_counter() - started
                result = evaluate_run(run_dir)
                kinds = ", ".join(
                    f"{kind} {100 * values['image_auroc']:.1f}"
                    for kind, values in sorted(result["per_kind"].items())
                )
                disc, recon = (100 * evaluate_run(run_dir, lam=lam)["image_auroc"] for lam in (1.0, 0.0))
                image, pixel = 100 * result["image_auroc"], 100 * result["pixel_auroc"]
                row = [
                    variant,
                    category,
                    f"{image:.1f}",
                    f"{pixel:.1f}",
                    kinds,
                    f"{disc:.1f}",
                    f"{recon:.1f}",
                ]
                print(f"| {' | '.join(row)} | {seconds:.0f} |", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
