"""`tfsearch predict` and `tfsearch.Detector`: score new images with a model written by `tfsearch export`.

A `Detector` holds one exported model. `predict(images)` resizes each image to the training size (PIL
bilinear, as the training data), runs the 18-step reverse process (`tfsearch.transfusion.inference`), fuses
M_disc and M_recon with the exported λ and n (`tfsearch.maps.fusion.fuse`) and returns each fused map resized
back to its image's own size (bilinear) with the image score, the maximum of the fused map at the training
size, exactly as the run scored its test images. An image is anomalous when its score reaches the exported
threshold.

`tfsearch predict EXPORT (IMAGE|DIR)... --out OUT` writes

    OUT/maps/CATEGORY/NAME.tiff       the fused map, float32, at the image's own size
    OUT/overlays/CATEGORY/NAME.png    the image with the map as a heat map (full colour at the threshold)
    OUT/scores.csv                    image, score, label (1 anomalous, 0 normal), map; written last

An image given by itself is NAME = its file name without the extension; an image found in a folder DIR keeps
its path below DIR's parent, DIR's own name included. So `tfsearch predict EXPORT data/bottle/test --out OUT`
writes `OUT/maps/bottle/test/<defect>/<name>.tiff`, the layout `tfsearch score --dataset-root data --maps
OUT/maps` reads. Every input is checked before any inference: an unreadable file or an image with other than
1 or 3 channels stops the command with the file's name, and nothing is skipped silently.

With `--address HOST:PORT` the batches go to Ray actors on a cluster, one model per GPU (one actor per CPU
node when the cluster has no GPU). The driver reads the files and writes every output, so no shared folder
is needed, and the workers run the same function on the same batches as a single machine does: the output is
the same.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tfsearch.data.images import IMAGE_EXTENSIONS, to_rgb
from tfsearch.deploy.manifest import Export, check_weights, read_export
from tfsearch.deploy.selected import plain_name
from tfsearch.errors import InputError
from tfsearch.infra.cluster import connect
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import image_scores
from tfsearch.store.atomic import atomic_write
from tfsearch.store.run_folder import write_csv
from tfsearch.transfusion.inference import anomaly_maps
from tfsearch.transfusion.runtime import PRECISIONS, Runtime
from tfsearch.transfusion.transparency import TransparencyProcess
from tfsearch.transfusion.unet import TransFusionUNet

SCORES_FILE = "scores.csv"
SCORE_COLUMNS = ("image", "score", "label", "map")
MAPS_DIR = "maps"
OVERLAYS_DIR = "overlays"
# image modes with one or three channels, which become RGB as the training images do
_ACCEPTED_BANDS = (1, 3)
# how many batches each worker of a cluster has queued at once
_BATCHES_IN_FLIGHT = 2


# ------------------------------------------------------------------------------------------ images
def channel_problem(image: Image.Image, name: str) -> str | None:
    """Why an opened image cannot be scored (it has 2 or 4 channels), or None."""
    bands = len(image.getbands())
    if bands in _ACCEPTED_BANDS:
        return None
    return f"{name}: {bands} channels (mode {image.mode}), expected RGB or greyscale"


def read_rgb(source: Path | bytes, name: str | None = None) -> np.ndarray:
    """uint8 (H, W, 3) from an image file or its bytes, decoded as the training images are."""
    name = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            problem = channel_problem(image, name)
            if problem is None:
                image.load()
                rgb = np.array(to_rgb(image), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {name}: {exc}") from None
    if problem is not None:
        raise InputError(f"image {problem}")
    return rgb


def as_rgb(image: np.ndarray | Path | str, index: int) -> np.ndarray:
    """An image of `Detector.predict` as uint8 (H, W, 3): a file, or an RGB or greyscale uint8 array."""
    if isinstance(image, (str, Path)):
        return read_rgb(Path(image))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(f"image {index} is {array.dtype}: expected uint8 values 0..255")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"image {index} has shape {array.shape}: expected (H, W, 3) RGB or (H, W) greyscale")
    return array


def resized(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An image or a float map resized bilinearly (PIL, antialiased) to `size` = (height, width)."""
    if array.shape[:2] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BILINEAR))


# ------------------------------------------------------------------------------------------ detector
class Detector:
    """One exported model: `Detector.load(EXPORT).predict(images) -> (maps, scores)`."""

    def __init__(self, export: Export, runtime: Runtime | None = None) -> None:
        self.runtime = runtime or Runtime(progress=False)
        if self.runtime.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {PRECISIONS}, got {self.runtime.precision!r}")
        self.manifest = export.manifest
        model = self.manifest["model"]
        self.category = export.category
        self.lam, self.kernel = float(model["lam"]), int(model["kernel"])
        self.threshold = float(self.manifest["threshold"]["value"])
        self.device = self.runtime.torch_device()
        # the weights' tensors are checked against the shapes the profile gives (on the meta device) before
        # the network is built: a profile the weights do not fit allocates nothing
        state = export.state_dict()
        profile = export.profile
        try:
            self.model = TransFusionUNet(profile)
            self.process = TransparencyProcess(profile.steps)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"{export.manifest_file}: invalid model profile (model.profile): {exc}"
            ) from None
        self.image_size = profile.image_size
        self.batch_size = profile.inference_batch
        self.precision = self.runtime.network_precision(profile, self.device)
        check_weights(self.model, state, f"{export.weights_file} (described by {export.manifest_file})")
        self.model.to(self.device).eval()
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, export: str | Path, device: str = "auto", precision: str = "auto") -> Detector:
        """Load an export folder (`EXPORT/CATEGORY` of `tfsearch export`), checked against its manifest."""
        return cls(read_export(Path(export)), Runtime(device=device, precision=precision, progress=False))

    def predict(
        self, images: Sequence[np.ndarray | Path | str], batch_size: int | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Fused anomaly maps (float32, each at its image's own size) and image scores (float32, N).

        `images`: files, or uint8 arrays (H, W, 3) RGB or (H, W) greyscale, of any sizes; a (N, H, W, 3)
        array is N images.
        """
        arrays = [as_rgb(image, index) for index, image in enumerate(images)]
        if not arrays:
            return [], np.zeros(0, dtype=np.float32)
        side = (self.image_size, self.image_size)
        batch = np.stack([resized(array, side) for array in arrays])
        m_disc, m_recon = anomaly_maps(
            self.model,
            self.process,
            torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(),
            batch_size=batch_size or self.batch_size,
            device=self.device,
            precision=self.precision,
        )
        fused = fuse(m_disc, m_recon, self.lam, self.kernel)
        maps = [resized(fused_map, array.shape[:2]) for fused_map, array in zip(fused, arrays, strict=True)]
        return maps, image_scores(fused)

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """1 for an anomalous image (score at or above the exported threshold), else 0."""
        return (np.asarray(scores) >= self.threshold).astype(np.int8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """The image under a jet heat map of `anomaly_map`, opaque in proportion up to half at the threshold."""
    from matplotlib import colormaps  # only for overlays: a Detector alone never loads matplotlib

    level = np.clip(anomaly_map / max(threshold, np.finfo(np.float32).tiny), 0.0, 1.0)
    colour = colormaps["jet"](level)[..., :3] * 255.0
    alpha = 0.5 * level[..., None]
    return np.round(image * (1.0 - alpha) + colour * alpha).astype(np.uint8)


# ------------------------------------------------------------------------------------------ files
@dataclass(frozen=True)
class InputImage:
    path: Path
    name: str  # output name without extension: "STEM", or "DIR/SUB/STEM" for an image found in DIR


@dataclass(frozen=True)
class Prediction:
    """One image's outputs, encoded: what a worker hands back to the driver, which writes them."""

    score: float
    label: int
    map_tiff: bytes
    overlay_png: bytes


def collect_images(arguments: Sequence[Path]) -> tuple[list[InputImage], list[Path]]:
    """The images to score, in argument order (a folder's sorted), and the folders' non-image files."""
    images: list[InputImage] = []
    ignored: list[Path] = []
    for argument in arguments:
        argument = Path(argument)
        if argument.is_file():
            images.append(InputImage(argument, argument.stem))
        elif argument.is_dir():
            files = sorted(
                p
                for p in argument.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(argument).parts)
            )
            found = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if not found:
                raise InputError(f"{argument} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            # the folder's own name as written (a `..` resolved, a symbolic link not followed)
            own = [Path(os.path.abspath(argument)).name] if Path(os.path.abspath(argument)).name else []
            images += [
                InputImage(p, PurePosixPath(*own, *p.relative_to(argument).with_suffix("").parts).as_posix())
                for p in found
            ]
        else:
            raise InputError(f"{argument}: no such image or folder")
    seen: dict[str, Path] = {}
    for image in images:
        if image.name in seen and seen[image.name] != image.path:
            raise InputError(
                f"{seen[image.name]} and {image.path} would both write the map {image.name}.tiff: "
                "rename one or give their folders instead"
            )
        seen[image.name] = image.path
    return list({image.name: image for image in images}.values()), ignored


def check_images(images: Sequence[InputImage]) -> None:
    """Open every image's header before any inference: unreadable files and wrong channel counts fail now."""
    problems = []
    for image in images:
        try:
            with Image.open(image.path) as opened:
                bands = len(opened.getbands())
            if bands not in _ACCEPTED_BANDS:
                problems.append(
                    f"{image.path}: {bands} channels (mode {opened.mode}), expected RGB or greyscale"
                )
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            problems.append(f"{image.path}: cannot read it ({exc})")
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"{len(problems)} of {len(images)} inputs cannot be scored: {listed}")


def predict_encoded(detector: Detector, batch: Sequence[tuple[str, bytes]]) -> list[Prediction]:
    """Score one batch of image files given as (name, bytes) and encode the map and overlay of each."""
    arrays = [read_rgb(content, name) for name, content in batch]
    maps, scores = detector.predict(arrays, batch_size=len(arrays))
    predictions = []
    for array, anomaly_map, score in zip(arrays, maps, scores, strict=True):
        tiff, png = io.BytesIO(), io.BytesIO()
        Image.fromarray(anomaly_map.astype(np.float32)).save(tiff, format="TIFF")
        Image.fromarray(overlay(array, anomaly_map, detector.threshold)).save(png, format="PNG")
        label = int(detector.labels(np.array([score]))[0])
        predictions.append(Prediction(float(score), label, tiff.getvalue(), png.getvalue()))
    return predictions


def read_batch(batch: Sequence[InputImage]) -> list[tuple[str, bytes]]:
    return [(str(image.path), image.path.read_bytes()) for image in batch]


class PredictWorker:
    """A Ray actor holding one model (on its GPU when it has one) for `predict --address`."""

    def __init__(self, export: Export, runtime: Runtime) -> None:
        self.detector = Detector(export, runtime)

    def predict(self, batch: list[tuple[str, bytes]]) -> list[Prediction]:
        return predict_encoded(self.detector, batch)


def cluster_predictions(
    export: Export, batches: list[list[InputImage]], runtime: Runtime, address: str, workers: int | None
) -> Iterator[list[Prediction]]:
    """Predictions of each batch, in order, from Ray actors: one per GPU (or per node without GPUs)."""
    import ray  # only with --address: a Detector and a local predict never load Ray

    connect(address, quiet=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or sum(1 for node in ray.nodes() if node["Alive"])
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    worker_class = ray.remote(**resources)(PredictWorker).options(scheduling_strategy="SPREAD")
    export_ref = ray.put(export)
    actors = [worker_class.remote(export_ref, runtime) for _ in range(count)]
    pending: deque = deque()
    try:
        for index, batch in enumerate(batches):
            pending.append(actors[index % count].predict.remote(read_batch(batch)))
            if len(pending) >= _BATCHES_IN_FLIGHT * count:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    finally:
        for actor in actors:
            ray.kill(actor)


def output_path(out: Path, kind: str, category: str, name: str, suffix: str) -> Path:
    """OUT/KIND/CATEGORY/NAME+SUFFIX, built from plain names only (NAME's folders and file name each one), and
    checked to stay under `out`: neither an export's category nor an image's name writes anywhere else."""
    *folders, stem = name.split("/")
    parts = [
        plain_name(kind, "the output folder"),
        plain_name(category, "the export's category"),
        *(plain_name(folder, f"a folder of the image name {name!r}") for folder in folders),
        plain_name(stem + suffix, f"the output file of the image {name!r}"),
    ]
    path = out.joinpath(*parts)
    root = os.path.normpath(os.path.abspath(out))
    if os.path.commonpath([root, os.path.normpath(os.path.abspath(path))]) != root:
        raise InputError(f"{path} would lie outside --out {out}: refused")
    return path


def run_prediction(
    export_dir: Path,
    inputs: Sequence[Path],
    out: Path,
    *,
    runtime: Runtime | None = None,
    batch_size: int | None = None,
    address: str | None = None,
    workers: int | None = None,
) -> list[dict]:
    """Score every input image and write maps, overlays and scores.csv under `out`; returns the rows."""
    runtime = runtime or Runtime(progress=False)
    out = Path(out)
    if (out / SCORES_FILE).exists():
        raise InputError(f"--out {out} already holds predictions ({SCORES_FILE}); choose another --out")
    export = read_export(Path(export_dir))
    images, ignored = collect_images(inputs)
    if ignored:
        print(
            f"predict: {len(ignored)} file(s) in the folders are not images and are not scored, e.g. "
            f"{ignored[0]}",
            file=sys.stderr,
        )
    check_images(images)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch {batch_size}: expected a positive number of images")
    category = export.category  # a plain name: read_export checked it
    batch_size = batch_size or export.profile.inference_batch
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    paths = [
        (output_path(out, MAPS_DIR, category, image.name, ".tiff"),
         output_path(out, OVERLAYS_DIR, category, image.name, ".png"))
        for image in images
    ]  # fmt: skip
    if address:
        export.state_dict()  # the weights fit the profile: checked here, before any worker loads them
        results = cluster_predictions(export, batches, runtime, address, workers)
    else:
        detector = Detector(export, runtime)
        results = (predict_encoded(detector, read_batch(batch)) for batch in batches)
    rows = []
    bar = tqdm(total=len(images), unit="img", desc=f"predict {category}", disable=not runtime.progress)
    started = time.perf_counter()
    outputs = iter(paths)
    for batch, predictions in zip(batches, results, strict=True):
        for image, prediction in zip(batch, predictions, strict=True):
            map_path, overlay_path = next(outputs)
            atomic_write(map_path, lambda handle, p=prediction: handle.write(p.map_tiff))
            atomic_write(overlay_path, lambda handle, p=prediction: handle.write(p.overlay_png))
            rows.append(
                {
                    "image": str(image.path),
                    "score": prediction.score,
                    "label": prediction.label,
                    "map": map_path.relative_to(out).as_posix(),
                }
            )
        bar.update(len(batch))
        bar.set_postfix_str(f"{len(rows) / (time.perf_counter() - started):.2f} images/s")
    bar.close()
    write_csv(out / SCORES_FILE, SCORE_COLUMNS, rows)
    return rows
