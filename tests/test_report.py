"""The reporter: the supplement's table shapes, like-for-like Δ, exact sensitivity curves from the maps,
protocols side by side, importance.csv, the HTML report in headless Chromium, the offline W&B run, and bad or
unfinished run folders."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import inspect_offline_run

from tfsearch import report
from tfsearch.cli import main
from tfsearch.errors import InputError
from tfsearch.maps.cache import MapSet, write_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.maps.metrics import GroundTruth, evaluate
from tfsearch.report.figures import KERNELS, LAMBDAS
from tfsearch.report.published import normalise
from tfsearch.store.run_folder import SELECTED_COLUMNS, TRIAL_COLUMNS
from tfsearch.transfusion.profiles import PROFILES

METRICS = ("image_auroc", "aupro", "pixel_auroc", "pixel_ap", "pixel_f1_max")
# supplementary Tables 1-4 verbatim from transfusion_supplementary.txt: per table its header row, its
# TransFusion row, a blank line and its caption
SUPPLEMENT_EXCERPT = Path(__file__).with_name("supplement_tables.txt")
SUPPLEMENT_FILE = Path("/work/shared/reference/transfusion_supplementary.txt")
TABLE_OF = {
    ("visa", "aupro"): 1,
    ("mvtec", "aupro"): 2,
    ("visa", "image_auroc"): 3,
    ("mvtec", "image_auroc"): 4,
}


def supplement(dataset: str, metric: str) -> tuple[list[str], list[float]]:
    """A supplementary table's columns (categories, then Average) and its published row."""
    lines = SUPPLEMENT_EXCERPT.read_text().splitlines()
    caption = next(
        i for i, line in enumerate(lines) if line.startswith(f"Table {TABLE_OF[(dataset, metric)]}:")
    )
    header, values = lines[caption - 3], lines[caption - 2]
    assert ("AUPRO" if metric == "aupro" else "AUROC") in lines[caption]
    assert ("VisA" if dataset == "visa" else "MVTec AD") in lines[caption]
    return header.split("\t")[1:], [float(v) for v in values.split("\t")[1:]]


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_maps(
    train_dir: Path, epoch: int, rng: np.random.Generator, images: int = 12, side: int = 12
) -> None:
    """A final-epoch test map cache: half the images anomalous, maps with a noisy blob where the defect is."""
    masks = np.zeros((images, side, side), dtype=bool)
    labels = np.arange(images) % 2
    for index in np.flatnonzero(labels):
        y, x = rng.integers(0, side - 4, 2)
        masks[index, y : y + 4, x : x + 3] = True
    m_disc = (0.15 * masks + rng.uniform(0, 0.6, masks.shape)).clip(0, 1).astype(np.float16)
    m_recon = (0.1 * masks + rng.uniform(0, 0.8, masks.shape)).clip(0, 1).astype(np.float16)
    meta = {"dataset": "demo", "category": train_dir.parent.name, "epoch": epoch, "split": "test",
            "image_size": side, "data_root": "", "mask_paths": [None] * images}  # fmt: skip
    ids = [f"test/x/{i:03d}" for i in range(images)]
    write_map_set(
        train_dir / "maps" / "test" / f"epoch-{epoch:04d}",
        MapSet(m_disc, m_recon, masks, labels.astype(np.int8), ids, meta),
    )


def make_run(
    root: Path,
    name: str,
    dataset: str,
    categories: list[str],
    *,
    space: str = "per_class",
    profile: str = "paper",
    select_on: str = "test",
    seed: int = 0,
    finished: bool = True,
    maps: bool = False,
    values: dict[str, float] | None = None,
) -> Path:
    """A run folder as `tfsearch run` writes it (config.json, trials.csv, selected.csv; with `maps`, the
    final-epoch test maps of each category). `values` fixes the default's and the selection's metrics."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    profile_dict = PROFILES[profile].to_dict()
    last = profile_dict["epochs"]
    milestones = [last // 2, last]
    config = {
        "name": name,
        "storage": str(run),
        "space": {"name": space, "source": f"{space}.yaml"},
        "scope": "per_class",
        "dataset": dataset,
        "categories": categories,
        "profile": profile_dict,
        "milestones": milestones,
        "select_on": select_on,
        "selection": {"metric": "image_auroc", "sampler": "tpe", "trials": 12},
    }
    (run / "config.json").write_text(json.dumps(config))
    split = "val" if select_on == "val" else "test"
    common = {"dataset": dataset, "space": space, "protocol": select_on, "model": "default", "split": split}
    trials, selected = [], []
    for category in categories:
        for epoch in milestones:
            metrics = dict(zip(METRICS, rng.uniform(0.5, 1.0, len(METRICS)), strict=True))
            trials.append({**common, **metrics, "category": category, "stage": "train", "epoch": epoch,
                           "lam": 0.95, "kernel": 7, "images_per_second": 10.0 + epoch,
                           "loss": 1 / epoch})  # fmt: skip
        default = dict(zip(METRICS, rng.uniform(0.5, 1.0, len(METRICS)), strict=True))
        chosen = dict(zip(METRICS, rng.uniform(0.5, 1.0, len(METRICS)), strict=True))
        if values:
            default = dict.fromkeys(METRICS, values[category])
            chosen = dict.fromkeys(METRICS, values[category])
        selected.append(
            {
                "dataset": dataset, "category": category, "space": space, "protocol": select_on,
                "selection_metric": "image_auroc", "default_model": "default", "default_epoch": last,
                "default_lam": 0.95, "default_kernel": 7, "default_selection_value": default["image_auroc"],
                **{f"default_test_{m}": v for m, v in default.items()},
                "selected_model": "default", "selected_epoch": int(rng.choice(milestones)),
                "selected_lam": float(rng.uniform(0.5, 1.0)),
                "selected_kernel": 2 * int(rng.integers(0, 4)) + 1,
                "selected_selection_value": chosen["image_auroc"],
                **{f"selected_test_{m}": v for m, v in chosen.items()},
            }
        )  # fmt: skip
        if maps:
            write_maps(run / "train" / category / "default", last, rng)
    if finished:
        write_csv(run / "trials.csv", TRIAL_COLUMNS, trials)
        write_csv(run / "selected.csv", SELECTED_COLUMNS, selected)
    return run


def by_category(rows: list[dict]) -> dict[str, dict]:
    return {row["category"]: row for row in rows}


def paper_rows(path: Path) -> tuple[list[str], dict[str, dict]]:
    """A paper table's CSV: (its columns, {row label: row})."""
    rows = read_csv(path)
    return list(rows[0])[1:], {row[""]: row for row in rows}


# ------------------------------------------------------------------------------------------ paper tables
def test_the_excerpt_is_the_supplements_text():
    if not SUPPLEMENT_FILE.is_file():
        pytest.skip(f"{SUPPLEMENT_FILE} is not on this machine")
    text = SUPPLEMENT_FILE.read_text()
    lines = SUPPLEMENT_EXCERPT.read_text().splitlines()
    for start in range(0, len(lines), 4):
        assert "\n".join(lines[start : start + 4]) + "\n" in text


@pytest.mark.parametrize("dataset", ["mvtec", "visa"])
def test_paper_tables_have_the_supplements_shape_order_and_numbers(tmp_path, dataset):
    names, _ = supplement(dataset, "aupro")
    published = report.PublishedNumbers()
    ours = published.categories(dataset)
    assert [normalise(c) for c in ours] == [normalise(c) for c in names[:-1]]
    values = {c: 0.9 + 0.005 * i for i, c in enumerate(ours)}
    single = make_run(tmp_path, "single", dataset, sorted(ours), values=values)  # alphabetical on purpose
    epochs = make_run(tmp_path, "epochs", dataset, sorted(ours), space="per_class_epochs", values=values)
    out = report.write_report([single, epochs], out=tmp_path / "out", wandb="disabled", quiet=True)
    for metric, key in (("aupro", f"paper_aupro_{dataset}"), ("image_auroc", f"paper_image_auroc_{dataset}")):
        header, printed = supplement(dataset, metric)
        columns, rows = paper_rows(out / "tables" / f"{key}.csv")
        assert [normalise(c) for c in columns] == [normalise(c) for c in header]  # order, Average last
        source = f"supplementary Table {TABLE_OF[(dataset, metric)]}"
        # both runs have their row; the per_class_epochs run first in Table 3/4, and only it has a Δ there
        if metric == "aupro":
            assert list(rows) == ["ours (single)", "ours (epochs)", source, "Δ (single)", "Δ (epochs)"]
        else:
            assert list(rows) == ["ours (epochs)", "ours (single)", source, "Δ (epochs)"]
        assert [float(rows[source][c]) for c in columns] == printed
        expected = [round(100 * values[c], 1) for c in ours]
        for run in ("single", "epochs"):
            assert [float(rows[f"ours ({run})"][c]) for c in ours] == pytest.approx(expected)
            assert float(rows[f"ours ({run})"]["Average"]) == round(100 * np.mean(list(values.values())), 1)
        assert float(rows["Δ (epochs)"][ours[0]]) == round(100 * values[ours[0]] - printed[0], 1)
        markdown = (out / "tables" / f"{key}.md").read_text()
        assert re.search(r"\| ours \(epochs\) *\| +\d+\.\d \|", markdown)  # one decimal
        latex = (out / "tables" / f"{key}.tex").read_text()
        for command in ("\\toprule", "\\midrule", "\\bottomrule", "$\\Delta$", "\\fontsize{8}"):
            assert command in latex
        assert "resizebox" not in latex and "scalebox" not in latex
    markdown = (out / "report.md").read_text()
    assert "which is what the supplement's table corresponds to" in markdown


def test_table_3_4_comes_from_per_class_epochs_and_says_which(tmp_path):
    categories = ["bottle", "cable"]
    per_class = make_run(tmp_path, "pc", "mvtec", categories, seed=1)
    epochs = make_run(tmp_path, "pce", "mvtec", categories, space="per_class_epochs", seed=2)
    out = report.write_report([per_class, epochs], out=tmp_path / "o1", wandb="disabled", quiet=True)
    _, rows = paper_rows(out / "tables" / "paper_image_auroc_mvtec.csv")
    assert list(rows) == ["ours (pce)", "ours (pc)", "supplementary Table 4", "Δ (pce)"]
    markdown = (out / "report.md").read_text()
    assert "From run pce (space per_class_epochs" in markdown
    assert "run pc (space per_class) also tune λ and n" in markdown
    # only a per_class run: Table 4 from it, with the reason there is no Δ; what to do is advice, not caption
    out = report.write_report([per_class], out=tmp_path / "o2", wandb="disabled", quiet=True)
    _, rows = paper_rows(out / "tables" / "paper_image_auroc_mvtec.csv")
    assert list(rows) == ["ours (pc)", "supplementary Table 4"]
    markdown = (out / "report.md").read_text()
    assert "searched space per_class, the supplement tuned the epochs only" in markdown
    assert "A run of space per_class_epochs gives Table 3/4 like for like." in markdown
    latex = (out / "tables" / "paper_image_auroc_mvtec.tex").read_text()
    assert "searched space per\\_class, the supplement tuned the epochs only" in latex
    assert "gives Table 3/4" not in latex and "compare-anyway" not in latex


def test_a_partial_run_compares_averages_over_the_same_categories(tmp_path):
    values = {"bottle": 0.9, "carpet": 0.999, "metal_nut": 1.0}
    run = make_run(tmp_path, "mv", "mvtec", list(values), values=values)
    out = report.write_report([run], wandb="disabled", quiet=True)
    columns, rows = paper_rows(out / "tables" / "paper_aupro_mvtec.csv")
    assert columns == ["carpet", "bottle", "metal_nut", "Average"]  # the supplement's order
    table2 = rows["supplementary Table 2"]
    assert float(table2["Average"]) == round(np.mean([95.9, 97.3, 94.1]), 1)  # not the printed 94.3
    latex = (out / "tables" / "paper_aupro_mvtec.tex").read_text()
    ours_line = next(line for line in latex.splitlines() if line.startswith("ours (mv)"))
    published_line = next(line for line in latex.splitlines() if line.startswith("supp. Table 2"))
    # the better of ours and published is bold: carpet ours 99.9 > 95.9, bottle 90.0 < 97.3
    assert ours_line.split(" & ")[1:3] == ["\\textbf{99.9}", "90.0"]
    assert published_line.split(" & ")[1:3] == ["95.9", "\\textbf{97.3}"]
    assert "metal\\_nut" in latex


# -------------------------------------------------------------------------------------- like for like
def test_each_published_source_has_its_own_column_and_delta(tmp_path):
    categories = report.PublishedNumbers().categories("mvtec")
    run = make_run(tmp_path, "all", "mvtec", categories)
    out = report.write_report([run], wandb="disabled", quiet=True)
    selected = by_category(read_csv(run / "selected.csv"))
    table = by_category(read_csv(out / "tables" / "single_config_mvtec.csv"))
    assert list(table) == [*categories, "mean (15)"]
    bottle = table["bottle"]
    assert float(bottle["image AUROC ours"]) == pytest.approx(
        100 * float(selected["bottle"]["default_test_image_auroc"])
    )
    # AUPRO: the supplement's Table 2 and the released checkpoints, each with its own Δ
    assert float(bottle["AUPRO supp. Table 2"]) == 97.3 and float(bottle["AUPRO released"]) == 97.81
    assert float(bottle["AUPRO Δ supp. Table 2"]) == pytest.approx(float(bottle["AUPRO ours"]) - 97.3)
    assert float(bottle["AUPRO Δ released"]) == pytest.approx(float(bottle["AUPRO ours"]) - 97.81)
    assert bottle["image AUROC abstract"] == ""  # the abstract publishes a mean only
    mean = table["mean (15)"]
    assert float(mean["image AUROC abstract"]) == 99.2 and float(mean["AUPRO supp. Table 2"]) == 94.3
    released = [float(table[c]["image AUROC released"]) for c in categories]
    assert float(mean["image AUROC released"]) == pytest.approx(np.mean(released))
    assert float(mean["image AUROC ours"]) == pytest.approx(
        np.mean([100 * float(selected[c]["default_test_image_auroc"]) for c in categories])
    )
    comparison = read_csv(out / "tables" / "published_comparison.csv")
    assert {r["source"] for r in comparison if r["metric"] == "aupro" and r["category"] == "bottle"} == {
        "supplementary Table 2",
        "released checkpoints (official repository results/*.csv)",
    }
    for row in comparison:
        assert row["protocol"] in ("single_config", "per_class_epochs")
        assert float(row["delta"]) == pytest.approx(float(row["ours"]) - float(row["published"]))


def test_a_cpu_profile_run_gets_no_delta_unless_asked(tmp_path, capsys):
    run = make_run(tmp_path, "cpu", "mvtec", ["bottle", "cable"], profile="cpu")
    out = report.write_report([run], wandb="disabled", quiet=True)
    _, rows = paper_rows(out / "tables" / "paper_aupro_mvtec.csv")
    assert list(rows) == ["ours (cpu)", "supplementary Table 2"]
    wide = read_csv(out / "tables" / "single_config_mvtec.csv")
    assert not any("Δ" in column for column in wide[0]) and "AUPRO released" in wide[0]
    assert read_csv(out / "tables" / "published_comparison.csv") == []
    markdown = (out / "report.md").read_text()
    assert "No Δ for run cpu: its profile differs from the paper's: image_size 64 (paper 256)" in markdown
    assert "epochs 40 (paper 1500)" in markdown
    assert (
        main(["report", str(run), "--out", str(tmp_path / "any"), "--wandb", "disabled", "--compare-anyway"])
        == 0
    )
    _, rows = paper_rows(tmp_path / "any" / "tables" / "paper_aupro_mvtec.csv")
    assert "Δ" in rows
    markdown = (tmp_path / "any" / "report.md").read_text()
    assert "Δ shown although run cpu is not like for like" in markdown
    assert "The Δ of such a run is shown because of `--compare-anyway`." in markdown


def test_category_names_map_to_the_published_ones_only_where_they_can(tmp_path):
    published = report.PublishedNumbers()
    assert published.lookup("mvtec", "Metal Nut", "single_config", "aupro", "supplementary Table 2") == 94.1
    assert (
        published.lookup("folder", "pipe-fryum", "per_class_epochs", "image_auroc", "supplementary Table 3")
        == 99.8
    )
    assert published.lookup("demo", "grid", "single_config", "aupro", "supplementary Table 2") is None
    run = make_run(tmp_path, "demo", "demo", ["disk", "stripes"])
    out = report.write_report([run], wandb="disabled", quiet=True)
    columns, rows = paper_rows(out / "tables" / "paper_aupro_demo.csv")
    assert columns == ["disk", "stripes", "Average"] and list(rows) == ["ours (demo)"]
    assert read_csv(out / "tables" / "published_comparison.csv") == []


# ------------------------------------------------------------------------------- protocols, importance
def test_protocols_side_by_side_and_importance(tmp_path):
    val = make_run(tmp_path, "val", "visa", ["candle", "pcb1"], select_on="val", seed=1)
    test = make_run(tmp_path, "test", "visa", ["candle", "pcb1"], seed=2)
    importance = [
        {"dataset": "visa", "scope": "candle", "parameter": p, "importance": v, "method": "fanova"}
        for p, v in (("epoch", 0.2), ("lam", 0.7), ("kernel", 0.1))
    ]
    write_csv(test / "importance.csv", ("dataset", "scope", "parameter", "importance", "method"), importance)
    out = report.write_report([val, test], out=tmp_path / "out", wandb="disabled", quiet=True)
    by_val, by_test = (
        by_category(read_csv(val / "selected.csv")),
        by_category(read_csv(test / "selected.csv")),
    )
    table = by_category(read_csv(out / "tables" / "protocols_visa.csv"))
    for category in ("candle", "pcb1"):
        row = table[category]
        assert float(row["default"]) == pytest.approx(
            100 * float(by_test[category]["default_test_image_auroc"])
        )
        assert float(row["val-selected"]) == pytest.approx(
            100 * float(by_val[category]["selected_test_image_auroc"])
        )
        oracle = 100 * float(by_test[category]["selected_test_image_auroc"])
        assert float(row["oracle-selected"]) == pytest.approx(oracle)
        assert float(row["oracle − val"]) == pytest.approx(oracle - float(row["val-selected"]))
    rows = read_csv(out / "tables" / "importance_test.csv")
    assert [(r["parameter"], float(r["importance"])) for r in rows] == [
        ("lam", 0.7),
        ("epoch", 0.2),
        ("kernel", 0.1),
    ]
    assert not (out / "tables" / "importance_val.csv").exists()  # no importance.csv: no table, no note
    # the validation run's tuned table has the published column but no Δ (selected on another split)
    tuned = read_csv(out / "tables" / "tuned_val.csv")
    assert "image AUROC supp. Table 3" in tuned[0] and not any("Δ" in c for c in tuned[0])
    markdown = (out / "report.md").read_text()
    assert "it selected on the validation split" in markdown
    assert "oracle − val measures the oracle protocol's optimism." in markdown
    # a test-selected run of another space is still paired, and the note says what the difference mixes
    other = make_run(tmp_path, "epochs", "visa", ["candle", "pcb1"], space="per_class_epochs", seed=3)
    out = report.write_report([val, other], out=tmp_path / "mixed", wandb="disabled", quiet=True)
    assert (out / "tables" / "protocols_visa.csv").is_file()
    assert "mixed with the difference of the two spaces" in (out / "report.md").read_text()


# --------------------------------------------------------------------------------------------- figures
def test_sensitivity_curves_equal_brute_force_fuse_and_metrics(tmp_path):
    categories = ["disk", "stripes", "grid"]
    run = make_run(tmp_path, "demo", "demo", categories, profile="cpu", maps=True)
    shutil.rmtree(run / "train" / "grid")  # a category without maps is named, not silently dropped
    loaded = report.load_run(run)
    from tfsearch.maps.cache import read_map_set
    from tfsearch.report.figures import run_curves

    curves = run_curves(loaded)
    maps = {c: read_map_set(loaded.test_maps(c)) for c in ("disk", "stripes")}
    lam0, n0 = PROFILES["cpu"].lam, PROFILES["cpu"].kernel

    def brute(lam: float, n: int) -> float:
        values = [
            evaluate(GroundTruth.from_masks(m.masks), fuse(m.m_disc, m.m_recon, lam, n))["image_auroc"]
            for m in maps.values()
        ]
        return 100 * float(np.mean(values))

    lam_curve, kernel_curve = curves["lam"], curves["kernel"]
    assert lam_curve.x == list(LAMBDAS) and kernel_curve.x == list(KERNELS)
    assert lam_curve.y == [brute(lam, n0) for lam in LAMBDAS]
    assert kernel_curve.y == [brute(lam0, n) for n in KERNELS]
    assert lam_curve.categories == ["disk", "stripes"] and lam_curve.missing == ["grid"]
    assert len(set(np.round(lam_curve.y, 9))) > 1  # the maps make λ matter
    out = report.write_report([run], wandb="disabled", quiet=True)
    for name in ("lambda_sensitivity", "kernel_sensitivity"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / "figures" / f"{name}.svg").read_text()
    points = read_csv(out / "figures" / "lambda_sensitivity.csv")
    assert [float(p["mean_image_auroc"]) for p in points] == pytest.approx(lam_curve.y)
    assert (
        "2 categories): disk, stripes; missing (no final-epoch test maps): grid."
        in (out / "report.html").read_text()
    )


def test_no_maps_no_curve_and_no_candidate_fallback(tmp_path):
    run = make_run(tmp_path, "mv", "mvtec", ["bottle"])
    out = report.write_report([run], wandb="disabled", quiet=True)
    assert not (out / "figures").exists() or not list((out / "figures").glob("*.png"))
    assert (
        "No sensitivity curve for mvtec: no run has its final-epoch test maps"
        in (out / "report.md").read_text()
    )


def test_import_leaves_torch_ray_and_the_search_out():
    code = (
        "import sys, tfsearch.report\n"
        "print([m for m in ('torch', 'ray', 'optuna', 'tfsearch.run.pipeline',"
        " 'tfsearch.transfusion.trainer', 'tfsearch.run.selection.candidates')"
        " if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- HTML in Chromium
def test_html_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("`chromium` is not on PATH (Debian: apt-get install chromium)")
    run = make_run(tmp_path, "pc", "demo", ["disk", "stripes"], profile="cpu", maps=True)
    out = report.write_report([run], wandb="disabled", quiet=True)
    page = (out / "report.html").read_text()
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(sources) == 2 and all(src.startswith("data:image/png;base64,") for src in sources)  # embedded
    # a copy with a script that, once everything has loaded, records in the DOM which images decoded
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
            " const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
            " const tables = document.querySelectorAll('table.report').length;"
            " document.body.insertAdjacentHTML('beforeend',"
            " `<p id='probe'>images ${imgs.length} loaded ${ok} tables ${tables}</p>`); });</script></body>",
        )
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1600",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    tables = page.count("<table ")
    assert tables >= 4 and re.search(rf"images 2 loaded 2 tables {tables}<", dom), dom[-2000:]
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={screenshot}", (out / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # text and lines, not a blank page


# ------------------------------------------------------------------------------------------------ W&B
def test_offline_wandb_run_holds_the_tables_and_figures(tmp_path):
    run = make_run(tmp_path, "mv", "mvtec", ["bottle", "cable"], maps=True, profile="cpu")
    out = report.write_report([run], out=tmp_path / "out", wandb="offline", quiet=True)
    (run_folder,) = (out / "wandb").glob("offline-run-*")
    summary = inspect_offline_run(run_folder)
    assert summary["state"] == "finished"
    tables = {k: v for k, v in summary["summary"].items() if k.startswith("tables/")}
    assert set(tables) == {
        "tables/paper_aupro_mvtec",
        "tables/paper_image_auroc_mvtec",
        "tables/single_config_mvtec",
        "tables/tuned_mv",
        "tables/training",
    }
    logged = tables["tables/single_config_mvtec"]
    assert logged["_type"] == "table-file" and logged["nrows"] == 3
    content = json.loads((run_folder / "files" / logged["path"]).read_text())
    ours = dict(zip(content["columns"], content["data"][0], strict=True))
    bottle = by_category(read_csv(run / "selected.csv"))["bottle"]
    assert ours["image AUROC ours"] == pytest.approx(100 * float(bottle["default_test_image_auroc"]))
    assert {k for k in summary["summary"] if k.startswith("figures/")} == {
        "figures/lambda_sensitivity",
        "figures/kernel_sensitivity",
    }
    assert "wandb sync" in (out / "wandb" / "SYNC.txt").read_text()
    assert "skipped offline" in (out / "report.md").read_text()


def test_online_wandb_needs_a_project(tmp_path):
    run = make_run(tmp_path, "mv", "mvtec", ["bottle"])
    with pytest.raises(InputError, match="--wandb online needs --wandb-project"):
        report.write_report([run], wandb="online", quiet=True)
    assert not (run / "report").exists()


# ------------------------------------------------------------------------------------------- bad input
def test_a_folder_that_is_not_a_run_is_rejected_by_name(tmp_path, capsys):
    with pytest.raises(InputError, match=rf"{re.escape(str(tmp_path))}: not a run folder: config.json"):
        report.write_report([tmp_path], wandb="disabled")
    with pytest.raises(InputError, match="no such directory"):
        report.write_report([tmp_path / "absent"], wandb="disabled")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json: not valid JSON"):
        report.load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "mvtec"}))
    with pytest.raises(InputError, match=r"keys \['categories', 'space', 'profile'\] are missing"):
        report.load_run(tmp_path)
    assert main(["report", str(tmp_path / "absent"), "--wandb", "disabled"]) == 2
    assert "absent: not a run folder" in capsys.readouterr().err


def test_a_table_without_its_columns_is_rejected(tmp_path):
    run = make_run(tmp_path, "mv", "mvtec", ["bottle"])
    write_csv(run / "trials.csv", ("dataset", "category", "stage"), [])
    with pytest.raises(InputError, match=r"trials.csv: columns \['model', 'epoch'"):
        report.load_run(run)
    write_csv(run / "importance.csv", ("dataset", "parameter"), [])
    (run / "trials.csv").unlink()
    with pytest.raises(InputError, match=r"importance.csv: columns \['scope', 'importance', 'method'\]"):
        report.load_run(run)


def test_an_unfinished_run_is_reported_as_far_as_it_got(tmp_path, capsys):
    run = make_run(tmp_path, "partial", "mvtec", ["bottle", "cable"], finished=False)
    log = run / "train" / "bottle" / "default" / "milestones.json"
    log.parent.mkdir(parents=True)
    milestone = {"category": "bottle", "model": "default", "epoch": 2, "lam": 0.95, "kernel": 3}
    log.write_text(json.dumps([milestone | {"split": "test", "image_auroc": 0.8125, "aupro": 0.5}]))
    assert main(["report", str(run), "--wandb", "disabled"]) == 0
    printed = capsys.readouterr().out
    assert "trials.csv is missing" in printed and "selected.csv is missing" in printed
    page = (run / "report" / "report.html").read_text()
    assert "id='missing'" in page and "selected.csv is missing" in page and "No sensitivity curve" in page
    assert not (run / "report" / "tables" / "paper_aupro_mvtec.csv").exists()
    (training,) = read_csv(run / "report" / "tables" / "training.csv")
    assert (training["category"], training["last epoch"], float(training["image AUROC"])) == (
        "bottle",
        "2",
        81.25,
    )
