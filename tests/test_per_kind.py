"""Metrics per defect kind: `tfsearch.maps.metrics.per_kind`, `tfsearch evaluate` (text and --json) and the
report's per-kind table, on map caches built with known image scores."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_report import make_run

from tfsearch import report
from tfsearch.cli import main
from tfsearch.data.datasets import defect_kind
from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, write_map_set
from tfsearch.maps.metrics import per_kind
from tfsearch.store.run_folder import maps_folder
from tfsearch.transfusion.job import TrainJob
from tfsearch.transfusion.profiles import get_profile

SIDE = 8
# (kind, image score): each map's maximum; an anomalous map holds it on its defect pixels, 0.1 less elsewhere.
# scratch beats every good image (image AUROC 1), stain beats 1 of 3 and 2 of 3 (AUROC 3/6 = 0.5), and over
# all defects 9 wins of 12 (0.75)
IMAGES = (
    ("good", 0.2),
    ("good", 0.4),
    ("good", 0.6),
    ("scratch", 0.7),
    ("scratch", 0.9),
    ("stain", 0.3),
    ("stain", 0.5),
)


def known_maps(epoch: int = 1, category: str = "cat") -> MapSet:
    """Maps whose fused maximum is each image's score at any λ (m_disc = m_recon) and n = 1."""
    rng = np.random.default_rng(0)
    masks = np.zeros((len(IMAGES), SIDE, SIDE), dtype=bool)
    maps = np.zeros(masks.shape, dtype=np.float32)
    for index, (kind, score) in enumerate(IMAGES):
        if kind == "good":
            maps[index] = score * rng.uniform(0.5, 1.0, (SIDE, SIDE))
            maps[index, 0, 0] = score
            continue
        y, x = rng.integers(0, SIDE - 3, 2)
        masks[index, y : y + 3, x : x + 2] = True
        maps[index] = np.where(masks[index], score, score - 0.1)
    ids = [f"test/{kind}/{index:03d}" for index, (kind, _) in enumerate(IMAGES)]
    labels = masks.any(axis=(1, 2)).astype(np.int8)
    meta = {"dataset": "folder", "category": category, "epoch": epoch, "split": "test", "image_size": SIDE,
            "data_root": "/data", "mask_paths": [None] * len(IMAGES)}  # fmt: skip
    return MapSet(maps, maps.copy(), masks, labels, ids, meta)


def sklearn_pixel_auroc(maps: MapSet, kind: str) -> float:
    """The reference: sklearn's AUROC over the pixels of the kind's images and the good ones."""
    chosen = [i for i, (k, _) in enumerate(IMAGES) if k in ("good", kind)]
    return roc_auc_score(maps.masks[chosen].ravel(), maps.m_disc[chosen].ravel())


def test_per_kind_scores_each_kind_against_every_normal_image():
    maps = known_maps()
    result = per_kind(maps.masks, maps.m_disc, [defect_kind(i) for i in maps.image_ids])
    assert list(result) == ["scratch", "stain"]
    assert result["scratch"]["anomalous"] == 2 and result["stain"]["anomalous"] == 2
    assert result["scratch"]["image_auroc"] == 1.0
    assert result["stain"]["image_auroc"] == 0.5
    for kind in result:
        assert result[kind]["pixel_auroc"] == pytest.approx(sklearn_pixel_auroc(maps, kind), abs=1e-12)
    with pytest.raises(InputError, match="one kind per image"):
        per_kind(maps.masks, maps.m_disc, ["good"])
    with pytest.raises(InputError, match="expected split/defect/name"):
        defect_kind("scratch.png")


def test_evaluate_gives_metrics_per_defect_kind(tmp_path, capsys):
    run = tmp_path / "run"
    profile = get_profile("cpu").replace(epochs=1, image_size=SIDE)
    job = TrainJob(dataset="folder", category="cat", profile=profile, data_root=tmp_path)
    run.mkdir()
    (run / "job.json").write_text(json.dumps(job.to_dict()))
    write_map_set(maps_folder(run, 1), known_maps())

    assert main(["evaluate", str(run), "--lam", "0.5", "--kernel", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_auroc"] == 0.75
    kinds = result["per_kind"]
    assert sorted(kinds) == ["scratch", "stain"]
    assert (kinds["scratch"]["image_auroc"], kinds["stain"]["image_auroc"]) == (1.0, 0.5)
    assert kinds["scratch"]["anomalous"] == 2
    for kind in kinds:
        assert kinds[kind]["pixel_auroc"] == pytest.approx(sklearn_pixel_auroc(known_maps(), kind), abs=1e-12)

    assert main(["evaluate", str(run), "--lam", "0.5", "--kernel", "1"]) == 0
    text = capsys.readouterr().out
    assert "per defect kind (its anomalous images against all 3 normal ones):" in text
    scratch_pixel = 100 * kinds["scratch"]["pixel_auroc"]
    assert f"scratch             2 images  image_auroc 100.00  pixel_auroc {scratch_pixel:.2f}" in text
    assert "stain               2 images  image_auroc 50.00" in text


def test_report_gives_metrics_per_kind_at_the_selected_configuration(tmp_path):
    run = make_run(tmp_path, "kinds", "mvtec", ["bottle", "cable"], profile="cpu")
    with (run / "selected.csv").open() as handle:
        reader = csv.DictReader(handle)
        columns, selected = reader.fieldnames, list(reader)
    selected[0]["selected_kernel"] = "1"  # bottle: n = 1, so each map's maximum is its known score
    with (run / "selected.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(selected)
    epoch, lam = int(selected[0]["selected_epoch"]), float(selected[0]["selected_lam"])
    maps = known_maps(epoch, "bottle")
    write_map_set(maps_folder(run / "train" / "bottle" / "default", epoch), maps)  # cable: none

    out = report.write_report([run], wandb="disabled", quiet=True)
    with (out / "tables" / "per_kind_kinds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["category"], r["kind"]) for r in rows] == [("bottle", "scratch"), ("bottle", "stain")]
    for row in rows:
        assert (int(row["epoch"]), float(row["λ"]), int(row["n"])) == (epoch, lam, 1)
        assert int(row["anomalous images"]) == 2
        assert float(row["pixel AUROC"]) == pytest.approx(100 * sklearn_pixel_auroc(maps, row["kind"]))
    assert [float(r["image AUROC"]) for r in rows] == [100.0, 50.0]
    document = (out / "report.md").read_text()
    assert "Without test maps of the selected configuration here: cable." in document
    # the paper-shaped tables are still there, as they were
    assert (out / "tables" / "paper_aupro_mvtec.csv").is_file()
    assert (out / "tables" / "paper_image_auroc_mvtec.csv").is_file()


def test_report_without_maps_says_there_is_no_per_kind_table(tmp_path):
    run = make_run(tmp_path, "bare", "mvtec", ["bottle"], profile="cpu")
    out = report.write_report([run], wandb="disabled", quiet=True)
    assert not (out / "tables" / "per_kind_bare.csv").exists()
    assert "No per-kind table for run bare: no category has the test maps" in (out / "report.md").read_text()
