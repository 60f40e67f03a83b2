"""Ablation of the quick profiles on the realistic demo: what a small TransFusion needs for subtle defects.

    python -m bench.ablation                                 # every variant of `cpu` on cork, fibre, marble
    python -m bench.ablation --categories marble --variants base,size128,textures+epochs120
    python -m bench.ablation --profile small --variants base --anchor   # the quick profile, the anchor

Each variant is the `--profile` (default `cpu`: 64 px, 16 channels, 40 epochs, lr 1e-3) with some fields
changed (`VARIANTS`; `base` changes nothing, `subtle` gives half the anomalies the subtle appearances of
`tfsearch.transfusion.synthesis`), or with real-photograph-like anomaly sources: `textures` gives the anomaly
synthesiser, in place of the procedural textures, a DTD-layout folder made of the good training images of the
realistic demo's other categories; `a+b` combines variants. Every (variant, category) trains from scratch on
`--dataset demo_real` (the profile's seed, 3) with one milestone, the last epoch, in the profile's precision
(`--precision auto`), then is scored at the profile's default λ and n, and at λ = 1 (the discriminative map
alone) and λ = 0 (the reconstruction map alone: whether that branch carries any signal at this size). It
prints one row per (variant, category): image and pixel AUROC, image AUROC per defect kind, the two
single-branch image AUROCs, and the training wall time. With `--anchor`, each category first gets a row of the
classical anchor (`bench/patch_gaussian.py`: one Gaussian over all colour patches of the good images) at each
image size the variants train at.
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

from bench.patch_gaussian import PATCH_AT_128, evaluate_category
from tfsearch.data.demo import realistic_demo_root
from tfsearch.data.demo_real import REALISTIC_CATEGORIES
from tfsearch.transfusion.evaluation import evaluate_run
from tfsearch.transfusion.job import TrainJob
from tfsearch.transfusion.profiles import PROFILES, get_profile
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import train

# profile fields changed from the base profile, per variant (`textures` changes the anomaly source instead)
VARIANTS: dict[str, dict[str, object]] = {
    "base": {},
    "size128": {"image_size": 128},
    "width32": {"base_channels": 32},
    "lr3e-4": {"lr": 3e-4},
    "epochs120": {"epochs": 120, "lr_step_epochs": 90},
    "steps10": {"steps": 10},
    "subtle": {"subtle_share": 0.5},  # half the anomalies the image itself, mildly changed
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


def row(
    label: str, category: str, metrics: dict, per_kind: dict, single: tuple[str, str], seconds: float
) -> str:
    """A table row: image and pixel AUROC, image AUROC per defect kind, the single-branch AUROCs, seconds."""
    kinds = ", ".join(f"{kind} {100 * value['image_auroc']:.1f}" for kind, value in sorted(per_kind.items()))
    cells = [
        label,
        category,
        f"{100 * metrics['image_auroc']:.1f}",
        f"{100 * metrics['pixel_auroc']:.1f}",
        kinds,
    ]
    return f"| {' | '.join([*cells, *single])} | {seconds:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", default="cpu", choices=sorted(PROFILES), help="the base of every variant"
    )
    parser.add_argument("--categories", default=",".join(REALISTIC_CATEGORIES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--anchor", action="store_true", help="the patch Gaussian at the same image sizes")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted({part for variant in variants for part in variant.split("+")} - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    profiles = {
        variant: get_profile(
            args.profile,
            milestone_every=10_000,
            **{k: v for part in variant.split("+") for k, v in VARIANTS[part].items()},
        )
        for variant in variants
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"# {machine}, base profile {args.profile}, load {os.getloadavg()[0]:.1f}")
    print(
        "| variant | category | image AUROC | pixel AUROC | per kind | λ=1 (disc) | λ=0 (recon) | train s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tfsearch-ablation-") as folder:
        root = Path(folder)
        for category in args.categories.split(",") if args.anchor else []:
            for size in sorted({profile.image_size for profile in profiles.values()}):
                patch = max(1, round(PATCH_AT_128 * size / 128))
                started = time.perf_counter()
                result = evaluate_category("demo_real", None, category, size, patch)
                seconds = time.perf_counter() - started
                label, metrics, kinds = f"patch Gaussian {size} px", result["metrics"], result["per_kind"]
                print(row(label, category, metrics, kinds, ("", ""), seconds), flush=True)
        for variant, profile in profiles.items():
            for category in args.categories.split(","):
                textures = texture_folder(root, category) if "textures" in variant.split("+") else None
                job = TrainJob("demo_real", category, profile, texture_root=textures)
                run_dir = root / f"{variant}-{category}"
                started = time.perf_counter()
                train(job, run_dir, Runtime(device="cpu", progress=False))
                seconds = time.perf_counter() - started
                single = tuple(
                    f"{100 * evaluate_run(run_dir, lam=lam)['image_auroc']:.1f}" for lam in (1.0, 0.0)
                )
                result = evaluate_run(run_dir)
                print(row(variant, category, result, result["per_kind"], single, seconds), flush=True)
    print(f"# load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
