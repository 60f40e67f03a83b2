"""The export format, read back as data and never trusted for paths or sizes: `manifest.json` checked key by
key (plain names, numbers in range, a profile within bounds), the weights read only as a regular file inside
the export folder, and their shapes compared with the network the profile describes before that network is
built."""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from tfsearch.deploy.selected import plain_name
from tfsearch.errors import InputError
from tfsearch.transfusion.profiles import Profile
from tfsearch.transfusion.unet import TransFusionUNet

EXPORT_FORMAT = "tfsearch-export"


EXPORT_VERSION = 1


MANIFEST_FILE = "manifest.json"


WEIGHTS_FILE = "weights.pt"


# what a manifest must hold, by section, for a model to be rebuilt and used
MANIFEST_KEYS = {
    "model": ("epoch", "lam", "kernel", "image_size", "profile"),
    "threshold": ("value",),
    "weights": ("file", "sha256"),
}


# bounds on the manifest's profile, far beyond any model tfsearch trains (the paper's: 256 px, 64 base
# channels, 4 levels of multipliers 1 and 2, 20 steps): a hostile or mistyped manifest is refused before
# anything is sized by it. The network's sizes are then checked against the weights' tensor shapes.
PROFILE_BOUNDS = {
    "image_size": (8, 4096),
    "base_channels": (1, 65536),
    "time_dim": (1, 65536),
    "blocks_per_level": (1, 8),
    "norm_groups": (1, 65536),
    "head_norm_groups": (1, 65536),
    "steps": (3, 1000),
    "inference_batch": (1, 4096),
}


MAX_LEVELS = 8  # entries of channel_mults (and of attention)


MAX_CHANNEL_MULT = 8


MAX_WIDTH = 65536  # base_channels times every multiplier: the widest layer


def check_weights(model, state: dict, where: str) -> None:
    """Load `state` into `model` strictly; a state dict of another architecture is an error naming `where`."""
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise InputError(f"{where} does not fit the model its profile describes: {detail[:300]}") from None


def expected_shapes(profile: Profile) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the state dict of `TransFusionUNet(profile)`, built on torch's meta
    device: nothing is allocated, whatever sizes the profile gives."""
    with torch.device("meta"):
        model = TransFusionUNet(profile)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_shapes(expected: dict[str, tuple[int, ...]], state: object, where: str) -> None:
    """An InputError naming `where` unless `state` is a state dict with exactly the tensors, of exactly the
    shapes, of `expected` (`expected_shapes` of a profile): checked before any network is built for real."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{where} is not a state dict of tensors (expected the weights tfsearch exports)")
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    wrong = [
        f"{name} is {tuple(state[name].shape)} in the weights, {shape} by the profile"
        for name, shape in expected.items()
        if name in state and tuple(state[name].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of other shapes (e.g. {wrong[0]})")
    if problems:
        raise InputError(f"{where} does not fit the model its profile describes: {'; '.join(problems)}")


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Export:
    """A checked export folder: its manifest and the bytes of its weights (their SHA-256 matches)."""

    folder: Path
    manifest: dict
    weights: bytes

    @property
    def manifest_file(self) -> Path:
        return self.folder / MANIFEST_FILE

    @property
    def weights_file(self) -> Path:
        return self.folder / self.manifest["weights"]["file"]

    @property
    def category(self) -> str:
        return self.manifest["category"]

    @property
    def profile(self) -> Profile:
        """The training profile of the exported model (its network and its number of β values)."""
        return Profile.from_dict(self.manifest["model"]["profile"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as a state dict, checked to fit the network of the manifest's profile (shape by shape,
        before any network is built)."""
        try:
            state = torch.load(io.BytesIO(self.weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a file that is not a state dict
            detail = " ".join(str(exc).split())[:300]
            raise InputError(f"cannot load {self.weights_file} as model weights: {detail}") from None
        try:
            expected = expected_shapes(self.profile)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InputError(f"{self.manifest_file}: invalid model profile (model.profile): {exc}") from None
        check_shapes(expected, state, f"{self.weights_file} (described by {self.manifest_file})")
        return state


def read_export(folder: Path) -> Export:
    """Read and check an export folder; anything that does not match is an InputError naming the file."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"EXPORT {folder}: {path} is missing (expected a folder written by tfsearch export)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise InputError(f'{path} is not a tfsearch export manifest (no "format": "{EXPORT_FORMAT}")')
    if manifest.get("format_version") != EXPORT_VERSION:
        versions = manifest.get("versions")
        written_by = versions.get("tfsearch") if isinstance(versions, dict) else None
        raise InputError(
            f"{path} has export format version {manifest.get('format_version')!r} (tfsearch "
            f"{written_by or 'an unknown version'}); this tfsearch reads version {EXPORT_VERSION}: export the"
            " run again with this version"
        )
    missing = [
        f"{section}.{key}"
        for section, keys in MANIFEST_KEYS.items()
        for key in keys
        if not isinstance(manifest.get(section), dict) or key not in manifest[section]
    ]
    if "category" not in manifest:
        missing.insert(0, "category")
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: it is not a complete export manifest")
    plain_name(manifest["category"], f"{path} category")
    check_manifest_values(manifest, path)
    weights_entry = manifest["weights"]
    weights_path = folder / plain_name(weights_entry["file"], f"{path} weights.file")
    weights = read_inside(weights_path, folder, f"named by {path} weights.file")
    digest = hashlib.sha256(weights).hexdigest()
    if digest != weights_entry.get("sha256"):
        raise InputError(
            f"{weights_path} does not match {path}: its SHA-256 is {digest}, the manifest says "
            f"{weights_entry.get('sha256')} (a corrupted or replaced file)"
        )
    return Export(folder, manifest, weights)


def read_inside(path: Path, folder: Path, named: str) -> bytes:
    """The bytes of `path`, a regular file directly in `folder`: never through a symbolic link, never a
    file whose resolved path leaves the folder (checked before it is opened, and again on what was opened)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise InputError(f"{path} is missing ({named})") from None
    except OSError as exc:
        raise InputError(f"cannot read {path} ({named}): {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise InputError(
            f"{path} is a symbolic link ({named}): expected the weights as a regular file in the export"
            " folder"
        )
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path} is not a regular file ({named}): expected the weights file itself")
    if path.resolve().parent != folder.resolve():
        raise InputError(f"{path} leads outside {folder} ({named}): expected a file in the export folder")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:  # ELOOP: it became a symbolic link since
        raise InputError(f"cannot open {path} ({named}) as a regular file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise InputError(f"{path} changed while it was read ({named}): try again")
        return handle.read()


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_manifest_values(manifest: dict, path: Path) -> None:
    """The manifest's numbers are of their types and in sane ranges, and its profile is a valid one whose
    network sizes stay within PROFILE_BOUNDS: an InputError naming the key and what was expected."""
    model = manifest["model"]
    if not _is_number(model["lam"]) or not 0.0 <= model["lam"] <= 1.0:
        raise InputError(f"{path} model.lam is {model['lam']!r}: expected a number from 0 to 1")
    if not _is_number(manifest["threshold"]["value"]):
        raise InputError(f"{path} threshold.value is {manifest['threshold']['value']!r}: expected a number")
    segmentation = manifest.get("segmentation_threshold")  # optional: exports before MVTec AD 2 lack it
    if segmentation is not None and not (
        isinstance(segmentation, dict) and _is_number(segmentation.get("value"))
    ):
        raise InputError(f"{path} segmentation_threshold is {segmentation!r}: expected {{value: a number}}")
    if not isinstance(manifest["weights"]["sha256"], str):
        raise InputError(f"{path} weights.sha256 is {manifest['weights']['sha256']!r}: expected a hex digest")
    if not isinstance(model["profile"], dict):
        raise InputError(f"{path} model.profile is {model['profile']!r}: expected the profile's fields")
    try:
        profile = Profile.from_dict(model["profile"])
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: invalid model profile (model.profile): {exc}") from None
    for field, (low, high) in PROFILE_BOUNDS.items():
        value = getattr(profile, field)
        if not low <= value <= high:
            raise InputError(
                f"{path} model.profile.{field} is {value}: expected an integer from {low} to {high}"
            )
    mults, attention = profile.channel_mults, profile.attention
    if not 1 <= len(mults) <= MAX_LEVELS or not all(_is_int(m) and 1 <= m <= MAX_CHANNEL_MULT for m in mults):
        raise InputError(
            f"{path} model.profile.channel_mults is {list(mults)}: expected 1 to {MAX_LEVELS} integers"
            f" from 1 to {MAX_CHANNEL_MULT}"
        )
    if len(attention) != len(mults) or not all(isinstance(a, bool) for a in attention):
        raise InputError(
            f"{path} model.profile.attention is {list(attention)}: expected one true or false per entry of "
            "channel_mults"
        )
    if profile.base_channels * math.prod(mults) > MAX_WIDTH:
        raise InputError(
            f"{path} model.profile: base_channels {profile.base_channels} times channel_mults {list(mults)} "
            f"is {profile.base_channels * math.prod(mults)} channels: expected at most {MAX_WIDTH}"
        )
    if profile.image_size % 2 ** (len(mults) - 1):
        raise InputError(
            f"{path} model.profile.image_size is {profile.image_size}: expected a multiple of "
            f"{2 ** (len(mults) - 1)} (the network halves it {len(mults) - 1} times)"
        )
    kernel = model["kernel"]
    if not _is_int(kernel) or kernel < 1 or kernel % 2 == 0 or kernel > 2 * profile.image_size + 1:
        raise InputError(
            f"{path} model.kernel is {kernel!r}: expected an odd integer from 1 to"
            f" {2 * profile.image_size + 1}"
        )
