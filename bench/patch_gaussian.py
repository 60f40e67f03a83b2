"""Benchmark: a classical anchor, one Gaussian over all colour patches of the good training images.

Location-free: every P×P colour patch of every training image (images first resized to --size) is a sample
of one multivariate Gaussian (mean and covariance, plus a small ridge so that the covariance inverts). A test
pixel's anomaly score is the Mahalanobis distance of the patch around it (the patch grid is upsampled to the
image), and an image's score is the maximum of its map. No learning beyond a mean and a covariance: a model
that learns should beat it at equal resolution. Scored with tfsearch's own metrics (image and pixel AUROC,
AUROC per defect kind, the test folder names).

Works on any dataset tfsearch reads (`--dataset mvtec --data-root DIR` for the real MVTec AD, `demo_real`
generated on first use, ...). Run from the repository root:
`python -m bench.patch_gaussian --dataset demo_real --sizes 64 128`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy import linalg

from tfsearch.cli.common import add_data_arguments
from tfsearch.data import datasets
from tfsearch.errors import InputError
from tfsearch.maps.metrics import GroundTruth, evaluate, per_kind

# patch side at 128 px; other sizes scale it (4 px at 64), as one patch then covers the same image area
PATCH_AT_128 = 8
# added to the covariance's diagonal, as a fraction of the mean patch variance
RIDGE = 0.01


def patches(image: np.ndarray, patch: int) -> np.ndarray:
    """float64 (positions, 3·P²): every P×P colour patch of an (H, W, 3) image, in row-major grid order."""
    windows = sliding_window_view(np.asarray(image, dtype=np.float64) / 255.0, (patch, patch), axis=(0, 1))
    return windows.reshape(-1, windows.shape[2] * patch * patch)


class PatchGaussian:
    """Mean and inverse covariance of the training images' patches, and the Mahalanobis maps they give."""

    def __init__(self, train_images: np.ndarray, patch: int, ridge: float = RIDGE) -> None:
        if patch < 1 or patch > min(train_images.shape[1:3]):
            raise InputError(f"--patch {patch} must be between 1 and the image side {train_images.shape[1]}")
        self.patch = patch
        total, outer, count = 0.0, 0.0, 0
        for image in train_images:  # one image's patches at a time: all of them would not fit in memory
            samples = patches(image, patch)
            total = total + samples.sum(axis=0)
            outer = outer + samples.T @ samples
            count += len(samples)
        self.mean = total / count
        covariance = outer / count - np.outer(self.mean, self.mean)
        covariance[np.diag_indices_from(covariance)] += ridge * np.trace(covariance) / len(covariance)
        # the inverse once (through Cholesky): one matrix product per test image then scores all its patches
        self.precision = linalg.cho_solve(linalg.cho_factor(covariance), np.eye(len(covariance)))

    def anomaly_map(self, image: np.ndarray) -> np.ndarray:
        """float32 (H, W): the Mahalanobis distance of each position's patch, bilinearly upsampled."""
        height, width = image.shape[:2]
        centred = patches(image, self.patch) - self.mean
        distance = np.sqrt(np.maximum(np.einsum("ij,ij->i", centred @ self.precision, centred), 0.0))
        grid = distance.reshape(height - self.patch + 1, width - self.patch + 1).astype(np.float32)
        return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def evaluate_category(
    dataset: str, data_root: Path | None, name: str, size: int, patch: int
) -> dict[str, object]:
    """Fit on the category's training images at `size` and score its test images with tfsearch's metrics."""
    category = datasets.load_category(dataset, data_root, name)
    model = PatchGaussian(datasets.load_images(category.train, size), patch)
    test_images = datasets.load_images(category.test, size)
    maps = np.stack([model.anomaly_map(image) for image in test_images])
    masks = datasets.load_masks(category.test, size)
    kinds = [datasets.defect_kind(sample.image_id) for sample in category.test]
    metrics = evaluate(GroundTruth.from_masks(masks), maps)
    return {"metrics": metrics, "per_kind": per_kind(masks, maps, kinds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser, multiple=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sides to run at")
    parser.add_argument(
        "--patch", type=int, default=None, help=f"patch side (default: {PATCH_AT_128} at 128 px, scaled)"
    )
    args = parser.parse_args()
    names = datasets.resolve_categories(args.dataset, args.data_root, args.category, args.categories)
    for size in args.sizes:
        patch = args.patch or max(1, round(PATCH_AT_128 * size / 128))
        print(f"\n{args.dataset} at {size} px, {patch}x{patch} patches (AUROC in %)")
        for name in names:
            start = time.perf_counter()
            result = evaluate_category(args.dataset, args.data_root, name, size, patch)
            seconds = time.perf_counter() - start
            metrics, kinds = result["metrics"], result["per_kind"]
            by_kind = ", ".join(f"{kind} {100 * values['image_auroc']:.1f}" for kind, values in kinds.items())
            print(
                f"{name}: image {100 * metrics['image_auroc']:.1f}, pixel {100 * metrics['pixel_auroc']:.1f}"
                f" | per kind (image): {by_kind} | {seconds:.1f} s"
            )


if __name__ == "__main__":
    main()
