"""Where SegF1's binarisation threshold comes from, one rule for the selection, the run's tables and the
export: mean + k·std of every pixel of the normal images of the validation maps at the same configuration
(`tfsearch.maps.metrics.segmentation_threshold`; k = 3, or the space's `seg_sigmas` as selected). A training
run's validation maps lie beside its test maps; only a run without any (the oracle protocol) sets the
threshold on the test set's own normal images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tfsearch.maps.cache import map_set_exists, read_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import SEG_THRESHOLD_SIGMAS, segmentation_threshold

# the split whose normal images set the SegF1 threshold when a training run has it
THRESHOLD_SPLIT = "val"


def threshold_rule(sigmas: float = SEG_THRESHOLD_SIGMAS) -> str:
    """The threshold rule in words, as the export's manifest and `tfsearch evaluate` state it."""
    return f"mean + {sigmas:g} std of the normal images' pixels"


def threshold_maps_dir(maps_dir: Path) -> Path | None:
    """The cached validation maps beside a milestone's test maps (`.../maps/val/epoch-N` for
    `.../maps/test/epoch-N`), where SegF1's threshold comes from; None for the validation maps themselves
    and for a run without validation maps (the oracle protocol), which set it on their own normal images."""
    maps_dir = Path(maps_dir)
    if maps_dir.parent.name == THRESHOLD_SPLIT:
        return None
    sibling = maps_dir.parent.parent / THRESHOLD_SPLIT / maps_dir.name
    return sibling if map_set_exists(sibling) else None


def milestone_seg_threshold(
    maps_dir: Path, lam: float, kernel: int, sigmas: float = SEG_THRESHOLD_SIGMAS
) -> dict:
    """SegF1's threshold for one milestone's maps at (λ, n) and k = `sigmas`, and what set it: `value`,
    `rule`, `split` (the split whose normal images were used) and `normal_images` (how many)."""
    source = threshold_maps_dir(maps_dir) or Path(maps_dir)
    maps = read_map_set(source)
    normal = ~np.asarray(maps.masks).any(axis=(1, 2))
    fused = fuse(maps.m_disc, maps.m_recon, lam, kernel)
    return {
        "value": segmentation_threshold(fused, normal, sigmas),
        "rule": threshold_rule(sigmas),
        "split": maps.meta.get("split") or source.parent.name,
        "normal_images": int(normal.sum()),
    }
