"""The reporter: tables equal the run's CSVs, Δ against the packaged published numbers, LaTeX, the HTML report
in headless Chromium, the offline W&B summary run, and bad or unfinished run folders."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import inspect_offline_run

from tfsearch import report
from tfsearch.cli import main
from tfsearch.errors import InputError
from tfsearch.run_folder import SELECTED_COLUMNS, TRIAL_COLUMNS

METRICS = ("image_auroc", "aupro", "pixel_auroc", "pixel_ap", "pixel_f1_max")
LAM_GRID = (0.0, 0.5, 0.8, 0.95, 1.0)


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def make_run(
    root: Path,
    name: str,
    dataset: str,
    categories: list[str],
    *,
    space: str = "per_class",
    select_on: str = "test",
    seed: int = 0,
    finished: bool = True,
    image_auroc: dict[str, float] | None = None,
) -> Path:
    """A small run folder as `tfsearch run` writes it: config.json, trials.csv, selected.csv.

    `space` is per_class (TPE candidates over epoch, λ, n) or lambda_sweep (a global grid over λ at the last
    epoch, image AUROC = 0.6 + 0.3·λ − 0.2·λ² + 0.01·category index). `image_auroc` fixes the default's value.
    """
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    sweep = space == "lambda_sweep"
    config = {
        "name": name,
        "storage": str(run),
        "space": {"name": space, "source": f"{space}.yaml"},
        "scope": "global" if sweep else "per_class",
        "dataset": dataset,
        "categories": categories,
        "profile": {"name": "cpu", "epochs": 4, "lam": 0.95, "kernel": 3},
        "milestones": [2, 4],
        "select_on": select_on,
        "selection": {"metric": "image_auroc", "sampler": "grid" if sweep else "tpe", "trials": 12},
    }
    (run / "config.json").write_text(json.dumps(config))
    split = "val" if select_on == "val" else "test"
    common = {"dataset": dataset, "space": space, "protocol": select_on, "model": "default"}
    trials, selected = [], []
    for index, category in enumerate(categories):
        for epoch in (2, 4):
            trials.append(
                {
                    **common,
                    **dict(zip(METRICS, rng.uniform(0.5, 1.0, len(METRICS)), strict=True)),
                    "category": category,
                    "stage": "train",
                    "split": split,
                    "epoch": epoch,
                    "lam": 0.95,
                    "kernel": 3,
                    "status": "ok",
                    "images_per_second": 10.0 + epoch,
                    "loss": 1 / epoch,
                }
            )
        if sweep:
            candidates = [(4, lam, 3) for lam in LAM_GRID]
        else:
            first = (int(rng.choice([2, 4])), float(rng.uniform(0.5, 1.0)), 2 * int(rng.integers(0, 4)) + 1)
            candidates = [first] + [(4, lam, k) for lam in (0.52, 0.58, 0.91, 0.97) for k in (1, 5)]
        for trial, (epoch, lam, kernel) in enumerate(candidates):
            value = 0.6 + 0.3 * lam - 0.2 * lam**2 + 0.01 * index if sweep else float(rng.uniform(0.4, 1.0))
            trials.append(
                {
                    **common,
                    "category": category,
                    "stage": "select",
                    "split": split,
                    "epoch": epoch,
                    "lam": lam,
                    "kernel": kernel,
                    "image_auroc": value,
                    "aupro": 0.5,
                    "objective": value,
                    "study": f"{space}/{dataset}/{category}",
                    "trial": trial,
                    "status": "complete",
                }
            )
        default = dict(zip(METRICS, rng.uniform(0.5, 1.0, len(METRICS)), strict=True))
        if image_auroc:
            default["image_auroc"] = image_auroc[category]
        chosen = dict(zip(METRICS, rng.uniform(0.5, 1.0, len(METRICS)), strict=True))
        selected.append(
            {
                "dataset": dataset,
                "category": category,
                "space": space,
                "protocol": select_on,
                "selection_metric": "image_auroc",
                "default_model": "default",
                "default_epoch": 4,
                "default_lam": 0.95,
                "default_kernel": 3,
                "default_selection_value": default["image_auroc"],
                **{f"default_test_{m}": v for m, v in default.items()},
                "selected_model": "default",
                "selected_epoch": int(rng.choice([2, 4])),
                "selected_lam": float(rng.uniform(0.5, 1.0)),
                "selected_kernel": 2 * int(rng.integers(0, 4)) + 1,
                "selected_selection_value": chosen["image_auroc"],
                **{f"selected_test_{m}": v for m, v in chosen.items()},
            }
        )
    if finished:
        write_csv(run / "trials.csv", TRIAL_COLUMNS, trials)
        write_csv(run / "selected.csv", SELECTED_COLUMNS, selected)
    return run


def by_category(rows: list[dict]) -> dict[str, dict]:
    return {row["category"]: row for row in rows}


# ---------------------------------------------------------------------------------------------- tables
def test_single_config_table_equals_selected_csv_with_published_delta(tmp_path):
    run = make_run(tmp_path, "mv", "mvtec", ["bottle", "carpet", "metal_nut"])
    out = report.write_report([run], wandb="disabled", quiet=True)
    assert out == run / "report"
    selected = by_category(read_csv(run / "selected.csv"))
    table = by_category(read_csv(out / "tables" / "single_config_mvtec.csv"))
    assert list(table) == ["bottle", "carpet", "metal_nut", "mean"]
    for category, source in selected.items():
        for metric in report.REPORT_METRICS:
            assert float(table[category][metric]) == pytest.approx(
                100 * float(source[f"default_test_{metric}"])
            )
    for metric in report.REPORT_METRICS:
        expected = np.mean([100 * float(s[f"default_test_{metric}"]) for s in selected.values()])
        assert float(table["mean"][metric]) == pytest.approx(expected)
    # image AUROC per category: released checkpoints only; AUPRO: the paper's supplementary Table 2 wins
    bottle = table["bottle"]
    assert float(bottle["image_auroc_published"]) == 100.0
    assert float(bottle["aupro_published"]) == 97.3
    assert float(table["metal_nut"]["pixel_ap_published"]) == 82.34
    for metric in report.REPORT_METRICS:
        ours, published = float(bottle[metric]), float(bottle[f"{metric}_published"])
        assert float(bottle[f"{metric}_delta"]) == pytest.approx(ours - published)
    # three of fifteen categories: a published mean would compare unlike things
    assert table["mean"]["image_auroc_published"] == "" and table["mean"]["image_auroc_delta"] == ""
    comparison = read_csv(out / "tables" / "published_comparison.csv")
    aupro = next(r for r in comparison if r["category"] == "bottle" and r["metric"] == "aupro")
    assert aupro["source"] == "supplementary Table 2" and aupro["protocol"] == "single_config"
    markdown = (out / "report.md").read_text()
    assert "The mean covers 3 of the 15 published categories" in markdown


def test_full_dataset_mean_is_compared_with_the_paper_average(tmp_path):
    categories = [
        "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule",
        "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
    ]  # fmt: skip
    run = make_run(tmp_path, "all", "mvtec", categories)
    out = report.write_report([run], wandb="disabled", quiet=True)
    mean = by_category(read_csv(out / "tables" / "single_config_mvtec.csv"))["mean"]
    assert float(mean["image_auroc_published"]) == 99.2  # paper abstract
    assert float(mean["aupro_published"]) == 94.3  # supplementary Table 2
    assert mean["pixel_ap_published"] == ""  # nothing published for the mean
    assert float(mean["image_auroc_delta"]) == pytest.approx(float(mean["image_auroc"]) - 99.2)


def test_tuned_table_equals_selected_csv_and_names_the_protocol(tmp_path):
    run = make_run(tmp_path, "visa-val", "visa", ["candle", "pcb1"], select_on="val", seed=1)
    out = report.write_report([run], wandb="disabled", quiet=True)
    selected = by_category(read_csv(run / "selected.csv"))
    table = by_category(read_csv(out / "tables" / "tuned_visa-val.csv"))
    for category, source in selected.items():
        row = table[category]
        assert int(row["epoch"]) == int(source["selected_epoch"])
        assert float(row["lam"]) == float(source["selected_lam"])
        assert int(row["kernel"]) == int(source["selected_kernel"])
        assert row["protocol"] == "validation"
        for metric in report.REPORT_METRICS:
            assert float(row[metric]) == pytest.approx(100 * float(source[f"selected_test_{metric}"]))
    # supplementary Table 3 (epochs tuned per class) publishes image AUROC only
    assert float(table["candle"]["image_auroc_published"]) == 98.3
    assert float(table["pcb1"]["image_auroc_delta"]) == pytest.approx(
        float(table["pcb1"]["image_auroc"]) - 99.1
    )
    assert "aupro_published" not in table["candle"]
    assert "selected per category by image AUROC on the validation split" in (out / "report.md").read_text()


def test_category_names_map_to_the_published_ones_only_where_they_can(tmp_path):
    published = report.PublishedNumbers()
    assert published.lookup("mvtec", "Metal Nut", "single_config", "aupro").value == 94.1
    assert published.lookup("folder", "pipe-fryum", "single_config", "image_auroc").value == 99.9
    assert published.lookup("visa", "chewing_gum", "per_class_epochs", "image_auroc").value == 99.9
    assert published.lookup("demo", "grid", "single_config", "aupro") is None
    assert published.lookup("mvtec", "candle", "single_config", "aupro") is None
    run = make_run(tmp_path, "demo", "demo", ["disk", "stripes"])
    out = report.write_report([run], wandb="disabled", quiet=True)
    rows = read_csv(out / "tables" / "single_config_demo.csv")
    assert all(r["image_auroc_published"] == "" and r["image_auroc_delta"] == "" for r in rows)
    assert read_csv(out / "tables" / "published_comparison.csv") == []


def test_latex_is_booktabs_with_the_better_value_bold(tmp_path):
    # bottle: ours 90.00 < released 100.00; carpet: ours 99.90 > released 97.99
    values = {"bottle": 0.9, "carpet": 0.999, "metal_nut": 1.0}
    run = make_run(tmp_path, "mv", "mvtec", list(values), image_auroc=values)
    out = report.write_report([run], wandb="disabled", quiet=True)
    latex = (out / "tables" / "single_config_mvtec.tex").read_text()
    for command in ("\\toprule", "\\midrule", "\\bottomrule", "\\cmidrule(lr){2-4}", "$\\Delta$"):
        assert command in latex
    bottle = next(line for line in latex.splitlines() if line.startswith("bottle &"))
    carpet = next(line for line in latex.splitlines() if line.startswith("carpet &"))
    assert bottle.split(" & ")[1:4] == ["90.00", "\\textbf{100.00}", "$-10.00$"]
    assert carpet.split(" & ")[1:4] == ["\\textbf{99.90}", "97.99", "$+1.91$"]
    # a tie is bold on both sides; an underscore is escaped
    metal_nut = next(line for line in latex.splitlines() if line.startswith("metal\\_nut &"))
    assert metal_nut.split(" & ")[1:4] == ["\\textbf{100.00}", "\\textbf{100.00}", "$+0.00$"]


def test_training_table_equals_the_last_milestone_of_trials_csv(tmp_path):
    run = make_run(tmp_path, "mv", "mvtec", ["bottle", "cable"], seed=3)
    out = report.write_report([run], wandb="disabled", quiet=True)
    trials = [r for r in read_csv(run / "trials.csv") if r["stage"] == "train" and r["epoch"] == "4"]
    table = by_category(read_csv(out / "tables" / "training.csv"))
    for trial in trials:
        row = table[trial["category"]]
        assert (row["epoch"], row["milestones"], row["split"]) == ("4", "2", "test")
        assert float(row["image_auroc"]) == pytest.approx(100 * float(trial["image_auroc"]))
        assert float(row["images_per_second"]) == float(trial["images_per_second"])


# --------------------------------------------------------------------------------------------- figures
def test_sensitivity_curves_come_from_the_sweep_else_from_the_candidates(tmp_path):
    per_class = make_run(tmp_path, "pc", "demo", ["disk", "stripes"])
    sweep = make_run(tmp_path, "sweep", "demo", ["disk", "stripes"], space="lambda_sweep")
    other = make_run(tmp_path, "mv", "mvtec", ["bottle", "cable"], seed=5)
    runs = [report.load_run(p) for p in (per_class, sweep, other)]

    lam_curves = {c.dataset: c for c in report.sensitivity_curves(runs, "lam")}
    assert set(lam_curves) == {"demo", "mvtec"}
    demo = lam_curves["demo"]
    assert "sweep (lambda_sweep" in demo.label
    assert demo.x == list(LAM_GRID)
    # the mean over the two categories of 0.6 + 0.3λ − 0.2λ² + 0.01·index, in points
    assert demo.y == pytest.approx([100 * (0.605 + 0.3 * lam - 0.2 * lam**2) for lam in LAM_GRID])

    # mvtec has no sweep: per-class candidates at the final epoch, λ binned by 0.05, mean per category first
    mvtec = lam_curves["mvtec"]
    assert "per-class candidates of mv" in mvtec.label
    rows = [r for r in read_csv(other / "trials.csv") if r["stage"] == "select" and r["epoch"] == "4"]
    bins: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        bins.setdefault((r["category"], round(float(r["lam"]) / 0.05) * 0.05), []).append(
            float(r["image_auroc"])
        )
    shared = sorted({x for c, x in bins if (("bottle", x) in bins and ("cable", x) in bins)})
    assert {0.5, 0.6, 0.9, 0.95} <= {round(x, 6) for x in shared}
    assert mvtec.x == pytest.approx(shared)
    for x, y in zip(shared, mvtec.y, strict=True):
        assert y == pytest.approx(100 * np.mean([np.mean(bins[(c, x)]) for c in ("bottle", "cable")]))

    kernel_curves = report.sensitivity_curves(runs, "kernel")
    assert [c.dataset for c in kernel_curves] == ["demo", "mvtec"]  # the λ sweep does not vary n
    assert "per-class candidates of pc" in kernel_curves[0].label and set(kernel_curves[0].x) >= {1.0, 5.0}

    out = report.write_report([per_class, sweep, other], out=tmp_path / "out", wandb="disabled", quiet=True)
    for name in ("lambda_sensitivity", "kernel_sensitivity"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / "figures" / f"{name}.svg").read_text()
    assert "Sources: demo: sweep (lambda_sweep" in (out / "report.html").read_text()


# ------------------------------------------------------------------------------------- HTML in Chromium
def test_html_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("`chromium` is not on PATH (Debian: apt-get install chromium)")
    run = make_run(tmp_path, "pc", "mvtec", ["bottle", "cable"])
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
            " document.body.insertAdjacentHTML('beforeend',"
            " `<p id='probe'>images ${imgs.length} loaded ${ok}</p>`); });</script></body>",
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
    assert re.search(r"images 2 loaded 2<", dom), dom[-2000:]
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
    run = make_run(tmp_path, "mv", "mvtec", ["bottle", "cable"])
    out = report.write_report([run], out=tmp_path / "out", wandb="offline", quiet=True)
    (run_folder,) = (out / "wandb").glob("offline-run-*")
    summary = inspect_offline_run(run_folder)
    assert summary["state"] == "finished"
    tables = {k: v for k, v in summary["summary"].items() if k.startswith("tables/")}
    assert set(tables) == {"tables/single_config_mvtec", "tables/tuned_mv", "tables/training"}
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
    assert "id='missing'" in page and "selected.csv is missing" in page and "No λ sensitivity figure" in page
    assert not (run / "report" / "tables" / "single_config_mvtec.csv").exists()
    (training,) = read_csv(run / "report" / "tables" / "training.csv")
    assert (training["category"], training["epoch"], float(training["image_auroc"])) == ("bottle", "2", 81.25)
