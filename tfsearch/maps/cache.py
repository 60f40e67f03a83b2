"""The map cache: raw anomaly maps of one (category, milestone epoch, split), kept so that a selection search
can score any (λ, n) without a GPU, a checkpoint or the dataset.

On-disk format, version 2. One folder per map set, holding:

    meta.json        {"version": 2, "dataset", "category", "epoch", "split", "image_size", "data_root",
                      "mask_paths": [one per image, the ground-truth file or null for a normal image],
                      "map_shape": [N, H, W], ...}  (writers may add keys, e.g. "profile")
    m_disc.npy       float32 (N, H, W): M_disc, the mean predicted mask (method.md §7.3)
    m_recon.npy      float32 (N, H, W): M_recon, the reconstruction error (method.md §7.4)
    masks.npy        uint8 (N, H, ceil(W / 8)): the binarised ground truth at map resolution,
                     `np.packbits(masks, axis=-1)`, so scoring needs no dataset
    labels.npy       int8 (N,): 0 normal, 1 anomalous
    image_ids.json   [N strings]: `Sample.image_id` of each image, in map order

Maps are raw: no mean filter, no blend. The ground truth is the reference the maps were scored against; the
mask paths in meta.json say where it came from. A cache of 200 maps of 256×256 takes 105 MB.

Version 1 stored the maps as float16 (half the size). On maps of real training runs that moved some metrics by
more than 0.01 points against float32 (bench/results/cache-precision.md: normal pixels of M_disc lie
below float16's normal range, and near 1 its step is 5e-4), so version 2 keeps float32. Version-1 caches are
still read (as float16, which the metrics widen to float32) and rewritten as version 2 when a milestone's
maps are written again.

A map set is written into a temporary folder beside its target and renamed into place. An existing map set
is first renamed aside and deleted only after the new one is in place, so a reader finds the complete old
set, the complete new one, or (after a crash between the two renames) none, never a mixture.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfsearch.errors import InputError

MAP_CACHE_VERSION = 2
MAP_DTYPES = {1: np.float16, 2: np.float32}  # map cache version -> dtype of its maps, every readable version
META_FILE = "meta.json"
IMAGE_IDS_FILE = "image_ids.json"
ARRAY_FILES = ("m_disc.npy", "m_recon.npy", "masks.npy", "labels.npy")
REQUIRED_META_KEYS = ("dataset", "category", "epoch", "split", "image_size", "data_root", "mask_paths")


@dataclass
class MapSet:
    """Raw maps and ground truth of one evaluation set; arrays read back from disk are read-only memmaps."""

    m_disc: np.ndarray  # float32 (N, H, W); float16 when read from a version-1 cache
    m_recon: np.ndarray  # the same
    masks: np.ndarray  # bool (N, H, W)
    labels: np.ndarray  # int8 (N,)
    image_ids: list[str]
    meta: dict[str, Any]


def write_map_set(directory: Path, maps: MapSet) -> None:
    """Write `maps` to `directory` atomically, replacing a map set already there."""
    directory = Path(directory)
    files = _encode(maps)
    if directory.exists() and not (directory / META_FILE).is_file() and any(directory.iterdir()):
        raise InputError(
            f"refusing to replace {directory}: it exists and is not a map cache (no {META_FILE})"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{secrets.token_hex(6)}.tmp"
    staging.mkdir()  # not mkdtemp's 0700: the maps keep the folder mode the umask gives, for a team to read
    try:
        for name, content in files.items():
            with open(staging / name, "wb") as handle:
                if isinstance(content, np.ndarray):
                    np.save(handle, content, allow_pickle=False)
                else:
                    handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_map_set(directory: Path) -> MapSet:
    """Load and check a map set; the maps are memory-mapped, the masks unpacked to bool."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"map cache {directory} does not exist or is not a folder")
    meta = _read_meta(directory / META_FILE)
    arrays = {name: _load_array(directory / name) for name in ARRAY_FILES}
    image_ids = _read_image_ids(directory / IMAGE_IDS_FILE)
    shape = tuple(meta["map_shape"])
    n_images, _, width = shape
    expected = {
        "m_disc.npy": (shape, MAP_DTYPES[meta["version"]]),
        "m_recon.npy": (shape, MAP_DTYPES[meta["version"]]),
        "masks.npy": ((*shape[:2], (width + 7) // 8), np.uint8),
        "labels.npy": ((n_images,), np.int8),
    }
    for name, (expected_shape, dtype) in expected.items():
        array = arrays[name]
        if array.shape != expected_shape or array.dtype != dtype:
            raise InputError(
                f"{directory / name} holds {array.dtype} {array.shape}: expected "
                f"{np.dtype(dtype)} {expected_shape} (map_shape {list(shape)} in {META_FILE})"
            )
    for name, count in (("image ids", len(image_ids)), ("mask_paths", len(meta["mask_paths"]))):
        if count != n_images:
            where = directory / (IMAGE_IDS_FILE if name == "image ids" else META_FILE)
            raise InputError(f"{where} lists {count} {name}: expected {n_images}, one per map")
    masks = np.unpackbits(arrays["masks.npy"], axis=-1, count=width).view(bool)
    return MapSet(arrays["m_disc.npy"], arrays["m_recon.npy"], masks, arrays["labels.npy"], image_ids, meta)


def map_set_exists(directory: Path) -> bool:
    """Whether `directory` holds a complete map set of a readable version (files present; array contents
    not checked). A trainer computes the maps of a milestone again where this is False."""
    return map_set_problem(directory) is None


def map_set_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete map set (None when it is): for messages that name a damaged one."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        return f"{directory} has no {META_FILE} (written last: the map set was never finished)"
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{directory / META_FILE} cannot be read ({exc}): damaged"
    if not isinstance(meta, dict) or meta.get("version") not in MAP_DTYPES:
        version = meta.get("version") if isinstance(meta, dict) else None
        return f"{directory / META_FILE}: map cache version {version!r} is not one this tfsearch reads"
    missing = [name for name in (*ARRAY_FILES, IMAGE_IDS_FILE) if not (directory / name).is_file()]
    if missing:
        return f"{directory}: {', '.join(missing)} missing beside {META_FILE}: damaged"
    return None


def _encode(maps: MapSet) -> dict[str, np.ndarray | bytes]:
    """The content of each file of `maps`, after checking that the parts fit together."""
    m_disc = np.asarray(maps.m_disc).astype(np.float32)
    m_recon = np.asarray(maps.m_recon).astype(np.float32)
    masks, labels = np.asarray(maps.masks), np.asarray(maps.labels)
    if m_disc.ndim != 3 or m_recon.shape != m_disc.shape or masks.shape != m_disc.shape:
        raise InputError(
            f"m_disc, m_recon and masks must share one (N, H, W) shape, got {m_disc.shape}, {m_recon.shape} "
            f"and {masks.shape}"
        )
    if masks.dtype != bool:
        raise InputError(f"masks must be bool, got {masks.dtype}")
    n_images = m_disc.shape[0]
    if labels.shape != (n_images,) or not np.isin(labels, (0, 1)).all():
        raise InputError(f"labels must be {n_images} values of 0 or 1, got shape {labels.shape}")
    if len(maps.image_ids) != n_images or len(set(maps.image_ids)) != n_images:
        raise InputError(f"image_ids must be {n_images} distinct ids, got {len(maps.image_ids)}")
    for name, array in (("m_disc", m_disc), ("m_recon", m_recon)):
        if not np.isfinite(array).all():
            raise InputError(
                f"{name} has NaN or inf values (after conversion to float32): expected finite maps"
            )
    missing = [key for key in REQUIRED_META_KEYS if key not in maps.meta]
    if missing:
        raise InputError(f"map set meta lacks {', '.join(missing)}: expected the keys {REQUIRED_META_KEYS}")
    if len(maps.meta["mask_paths"]) != n_images:
        raise InputError(f"meta mask_paths lists {len(maps.meta['mask_paths'])} paths: expected {n_images}")
    meta = {**maps.meta, "version": MAP_CACHE_VERSION, "map_shape": list(m_disc.shape)}
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise InputError(f"map set meta must be JSON-serialisable: {exc}") from exc
    return {
        "m_disc.npy": m_disc,
        "m_recon.npy": m_recon,
        "masks.npy": np.packbits(masks, axis=-1),
        "labels.npy": labels.astype(np.int8),
        IMAGE_IDS_FILE: (json.dumps(list(maps.image_ids)) + "\n").encode(),
        META_FILE: meta_text.encode(),  # written last: a staging folder without it is never a map set
    }


def _replace_folder(staging: Path, directory: Path) -> None:
    """Rename `staging` to `directory`; an existing `directory` is moved aside first and removed after."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
    os.replace(directory, retired / directory.name)
    os.replace(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"map cache file {path} is missing") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read map cache file {path}: {exc}") from exc


def _read_meta(path: Path) -> dict[str, Any]:
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise InputError(f"{path} must hold a JSON object")
    if meta.get("version") not in MAP_DTYPES or isinstance(meta.get("version"), bool):
        raise InputError(
            f"{path} has version {meta.get('version')!r}: expected one of {sorted(MAP_DTYPES)} (rewrite the"
            " cache)"
        )
    missing = [key for key in (*REQUIRED_META_KEYS, "map_shape") if key not in meta]
    if missing:
        raise InputError(f"{path} lacks the key(s) {', '.join(missing)}")
    shape = meta["map_shape"]
    if not (
        isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v >= 0 for v in shape)
    ):
        raise InputError(f"{path}: map_shape {shape!r} must be [N, H, W]")
    return meta


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"map cache file {path} is missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read map cache file {path}: {exc}") from exc


def _read_image_ids(path: Path) -> list[str]:
    image_ids = _read_json(path)
    if not (isinstance(image_ids, list) and all(isinstance(item, str) for item in image_ids)):
        raise InputError(f"{path} must hold a JSON list of image id strings")
    return image_ids
