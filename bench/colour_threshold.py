"""How strong a colour shift must be before a trained run finds it: a probe of what its maps can see.

    python -m bench.colour_threshold RUN [--epoch E] [--levels 8,16,32,64] [--radius 0.12] [--anchor]

Takes the run's good test images, adds to each a disc (radius a fraction of the image side, at the centre) of
one constant RGB shift, and scores the shifted images against the unshifted ones with the milestone's weights
at the run's λ and n (image score: the maximum of the fused map, as in evaluation). One row per direction and
strength (the Euclidean length of the shift in 0-255 levels): the image AUROC of shifted against unshifted,
and the share of shifted images whose maximum lies in the disc or on its edge (within 1/16 of the side: a
patch or filter that straddles the edge sees the step there).

The directions are the category's own colour axes (principal components of its good training pixels:
`axis 1` is the way its colours vary most, `axis 3` least), a uniform darkening, and, on `demo_real`, the
tints of its `discolour` defects. A model that ranks a shift along the material's own variation below one
across it sees colour as the training pixels' spread suggests; one that misses a shift every human sees has
not learned that kind of anomaly. `--anchor` prints the same rows for the patch Gaussian
(`bench/patch_gaussian.py`) fitted to the category's good training images at the run's image size. Run from
the repository root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.patch_gaussian import PATCH_AT_128, PatchGaussian
from tfsearch.data import datasets
from tfsearch.data.demo_real import TINTS
from tfsearch.errors import InputError
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import auroc, image_scores
from tfsearch.transfusion.inference import anomaly_maps
from tfsearch.transfusion.job import TrainDir
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import Trainer


def colour_axes(train_images: np.ndarray) -> dict[str, np.ndarray]:
    """Unit RGB directions: the principal axes of the training pixels' colours, most varied first."""
    pixels = train_images.reshape(-1, 3).astype(np.float64)
    _, _, axes = np.linalg.svd(pixels - pixels.mean(axis=0), full_matrices=False)
    return {f"axis {index + 1}": axis for index, axis in enumerate(axes)}


def directions(dataset: str, train_images: np.ndarray) -> dict[str, np.ndarray]:
    """Every probed direction, as a unit RGB vector."""
    named = {**colour_axes(train_images), "darker": -np.ones(3)}
    if dataset == "demo_real":
        named.update({f"tint {name}": np.array(tint) for name, tint in TINTS.items()})
    return {name: vector / np.linalg.norm(vector) for name, vector in named.items()}


def shifted(images: np.ndarray, disc: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W,3): `images` with `shift` (RGB levels) added inside `disc`, rounded and clipped."""
    result = images.astype(np.float64) + disc[None, :, :, None] * shift
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)


def shift_levels(text: str) -> list[float]:
    """--levels: comma-separated positive numbers of 0-255 levels."""
    try:
        levels = [float(level) for level in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return levels


def disc_radius(text: str) -> float:
    """--radius: a fraction of the image side above 0 and at most 0.5 (the disc stays inside the image)."""
    radius = float(text)
    if not 0 < radius <= 0.5:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 0.5], got {text}")
    return radius


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a folder written by `tfsearch train`")
    parser.add_argument("--epoch", type=int, default=None, help="a milestone (default: the last)")
    parser.add_argument(
        "--levels", type=shift_levels, default=[8.0, 16.0, 32.0, 64.0], help="shift lengths in 0-255 levels"
    )
    parser.add_argument(
        "--radius", type=disc_radius, default=0.12, help="disc radius, a fraction of the side"
    )
    parser.add_argument("--anchor", action="store_true", help="the patch Gaussian's rows as well")
    args = parser.parse_args()

    train_dir = TrainDir(args.run_dir)
    try:
        job = train_dir.load_job()
    except InputError as error:
        parser.error(str(error))
    available = train_dir.weight_epochs()
    if not available:
        parser.error(f"{args.run_dir} has no milestone weights yet")
    epoch = available[-1] if args.epoch is None else args.epoch
    if epoch not in available:
        parser.error(f"--epoch {epoch}: {args.run_dir} has weights at epochs {available}")
    trainer = Trainer(job, args.run_dir, Runtime(progress=False))
    trainer.load_weights(epoch)
    profile = job.profile
    category = datasets.load_category(job.dataset, job.data_root, job.category)
    size = profile.image_size
    good = datasets.load_images([s for s in category.test if s.label == 0], size)
    train_images = datasets.load_images(category.train, size)
    rows, cols = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    distance = np.hypot(rows - centre, cols - centre)
    disc = distance <= args.radius * size
    near = distance <= args.radius * size + size / 16

    def model_maps(images: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        m_disc, m_recon = anomaly_maps(
            trainer.model,
            trainer.process,
            tensor,
            batch_size=profile.inference_batch,
            device=trainer.device,
            precision=trainer.precision,
        )
        return fuse(m_disc, m_recon, profile.lam, profile.kernel)

    scorers = {f"epoch {epoch}": model_maps}
    if args.anchor:
        anchor = PatchGaussian(train_images, max(1, round(PATCH_AT_128 * size / 128)))
        scorers["patch Gaussian"] = lambda images: np.stack([anchor.anomaly_map(image) for image in images])
    print(
        f"# {job.dataset}/{job.category}, {len(good)} good test images at {size} px, disc radius "
        f"{args.radius * size:.1f} px; the run's maps at λ {profile.lam}, n {profile.kernel}"
    )
    print("| model | direction | RGB (unit) | shift (levels) | image AUROC | max at the disc |")
    print("|---|---|---|---|---|---|")
    labels = np.r_[np.zeros(len(good)), np.ones(len(good))]
    probed = directions(job.dataset, train_images)
    for model, maps_of in scorers.items():
        baseline = image_scores(maps_of(good))
        for name, direction in probed.items():
            rgb = ", ".join(f"{value:+.2f}" for value in direction)
            for level in args.levels:
                maps = maps_of(shifted(good, disc, level * direction))
                scores = image_scores(maps)
                result = auroc(labels, np.r_[baseline, scores])
                inside = maps[:, near].max(axis=1) >= scores
                cells = [model, name, rgb, f"{level:.0f}", f"{100 * result:.1f}", f"{inside.mean():.2f}"]
                print(f"| {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
