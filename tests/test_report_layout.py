"""The report as its readers read it: several runs of one dataset each with their row, the paper tables as
LaTeX a one-column paper can use, the HTML report's alignment, code and links, and the figures' points."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_report import make_run, paper_rows, read_csv

from tfsearch import report
from tfsearch.report.figures import KERNELS

MVTEC = report.PublishedNumbers().categories("mvtec")
TEXT_WIDTH_PT = 345.0  # LNCS's text width (122 mm), ECCV's format: one column


# ------------------------------------------------------------------------------- several runs, one dataset
def test_every_run_of_a_dataset_has_its_row_in_the_paper_tables_figures_and_single_config(tmp_path):
    first = make_run(tmp_path, "first", "demo", ["disk", "stripes"], profile="cpu", maps=True, seed=1)
    second = make_run(tmp_path, "second", "demo", ["disk", "stripes"], profile="cpu", maps=True, seed=2)
    out = report.write_report([first, second], out=tmp_path / "out", wandb="disabled", quiet=True)
    for key in ("paper_aupro_demo", "paper_image_auroc_demo"):
        _, rows = paper_rows(out / "tables" / f"{key}.csv")
        assert list(rows) == ["ours (first)", "ours (second)"]
        column = "default_test_aupro" if "aupro" in key else "selected_test_image_auroc"
        for name, run in (("first", first), ("second", second)):
            chosen = {r["category"]: float(r[column]) for r in read_csv(run / "selected.csv")}
            assert float(rows[f"ours ({name})"]["disk"]) == round(100 * chosen["disk"], 1)
    single = read_csv(out / "tables" / "single_config_demo.csv")
    assert [(r["run"], r["category"]) for r in single] == [
        (name, category) for name in ("first", "second") for category in ("disk", "stripes", "mean (2)")
    ]
    by_run = {(r["run"], r["category"]): r for r in single}
    second_disk = next(r for r in read_csv(second / "selected.csv") if r["category"] == "disk")
    assert float(by_run[("second", "disk")]["image AUROC ours"]) == pytest.approx(
        100 * float(second_disk["default_test_image_auroc"])
    )
    for name in ("lambda_sensitivity", "kernel_sensitivity"):
        points = read_csv(out / "figures" / f"{name}.csv")
        assert list(dict.fromkeys(p["run"] for p in points)) == ["first", "second"]
    caption = (out / "report.md").read_text()
    assert "demo: first (epoch" in caption and "demo: second (epoch" in caption


def test_several_mvtec_runs_each_get_their_delta_and_comparison_rows(tmp_path):
    values = {c: 0.95 for c in MVTEC}
    a = make_run(tmp_path, "a", "mvtec", MVTEC, space="per_class_epochs", values=values)
    b = make_run(tmp_path, "b", "mvtec", MVTEC[:3], space="per_class_epochs", values=values)  # 3 categories
    out = report.write_report([a, b], out=tmp_path / "out", wandb="disabled", quiet=True)
    columns, rows = paper_rows(out / "tables" / "paper_image_auroc_mvtec.csv")
    assert list(rows) == ["ours (a)", "ours (b)", "supplementary Table 4", "Δ (a)", "Δ (b)"]
    assert rows["ours (b)"][MVTEC[5]] == ""  # a category run b lacks is blank, not another run's value
    published = {c: float(rows["supplementary Table 4"][c]) for c in MVTEC}
    # b's Δ of the Average is against the published mean over b's own three categories
    own = sum(published[c] for c in MVTEC[:3]) / 3
    assert float(rows["Δ (b)"]["Average"]) == pytest.approx(round(95.0 - own, 1), abs=0.051)
    comparison = [
        r for r in read_csv(out / "tables" / "published_comparison.csv") if r["table"].startswith("paper")
    ]
    assert {r["run"] for r in comparison} == {"a", "b"}
    assert len([r for r in comparison if r["run"] == "b" and r["metric"] == "image_auroc"]) == 4  # 3 + mean
    assert "Average: the mean of each run's own categories (a 15, b 3)." in (out / "report.md").read_text()


def test_runs_of_the_same_name_keep_their_own_rows_and_a_run_given_twice_is_read_once(tmp_path, capsys):
    here = make_run(tmp_path / "here", "per_class-demo", "demo", ["disk"], seed=1)
    there = make_run(tmp_path / "there", "per_class-demo", "demo", ["disk"], seed=2)
    out = report.write_report([here, there, here], out=tmp_path / "out", wandb="disabled")
    _, rows = paper_rows(out / "tables" / "paper_aupro_demo.csv")
    assert list(rows) == ["ours (per_class-demo@here)", "ours (per_class-demo@there)"]
    assert {p.name for p in (out / "tables").glob("tuned_*.csv")} == {
        "tuned_per_class-demo@here.csv",
        "tuned_per_class-demo@there.csv",
    }
    assert f"{here} was given more than once: reported once." in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- LaTeX
def budget_width(tabular: str, font_pt: float, sep_pt: float) -> float:
    """A column-width budget of a tabular, independent of how the report estimates it: every character
    0.55 em at the font size (Computer Modern's lowercase and digits average about 0.5 em), a number at
    least 5 characters, and the column separation on each side of each value column."""

    def length(cell: str) -> int:
        cell = re.sub(r"\\textbf\{(.*)\}", r"\1", cell.strip())
        cell = cell.replace("$-$", "-").replace("$\\Delta$", "D").replace("\\_", "_")
        return len(cell)

    rows = [line.rstrip("\\ ").split(" & ") for line in tabular.splitlines() if " & " in line]
    label = max(length(row[0]) for row in rows)
    columns = max(len(row) for row in rows) - 1
    shared = [max([5, *(length(row[j]) for row in rows if j < len(row))]) for j in range(1, columns + 1)]
    return (label + sum(shared)) * 0.55 * font_pt + columns * 2 * sep_pt


@pytest.mark.parametrize("runs", [1, 2])
def test_the_15_category_latex_tables_fit_a_one_column_page_at_7_pt_or_more(tmp_path, runs):
    made = [
        make_run(tmp_path, name, "mvtec", MVTEC, space="per_class_epochs", seed=index)
        for index, name in enumerate(["per_class_epochs-mvtec", "second-run"][:runs])
    ]
    cpu = make_run(tmp_path, "cpu", "mvtec", MVTEC, profile="cpu", seed=7)  # no Δ: advice, not caption
    out = report.write_report([*made, cpu], out=tmp_path / "out", wandb="disabled", quiet=True)
    for key in ("paper_aupro_mvtec", "paper_image_auroc_mvtec"):
        latex = (out / "tables" / f"{key}.tex").read_text()
        assert "resizebox" not in latex and "scalebox" not in latex  # never scaled down
        size = float(re.search(r"\\fontsize\{([\d.]+)\}", latex).group(1))
        assert size >= 7
        sep = float(re.search(r"\\tabcolsep\}\{([\d.]+)pt\}", latex).group(1))
        tabular = latex[latex.index("\\begin{tabular}") : latex.index("\\end{tabular}")]
        assert budget_width(tabular, size, sep) <= TEXT_WIDTH_PT
        assert tabular.count("\\midrule[\\heavyrulewidth]") >= 1  # in panels, as wide as the page allows
        headers = [
            cell.strip().replace("\\_", "_")
            for line in tabular.splitlines()
            if line.startswith(" & ")
            for cell in line.rstrip(" \\").split("&")
        ]
        assert set(headers) >= {*MVTEC, "Average"}  # every category in some panel
        caption = re.search(r"\\caption\{(.*)\}", latex).group(1)
        assert "No $\\Delta$ for run cpu" in caption or key == "paper_image_auroc_mvtec"
        for advice in ("compare-anyway", "give such a run", "`", "tfsearch"):
            assert advice not in caption
    markdown = (out / "report.md").read_text()
    assert "`tfsearch report --compare-anyway` shows such a Δ." in markdown  # the advice stays here
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        return  # the budget above stands in for TeX
    document = tmp_path / "paper.tex"
    inputs = "".join(
        f"\\input{{{out / 'tables' / key}.tex}}\n" for key in ("paper_aupro_mvtec", "paper_image_auroc_mvtec")
    )
    document.write_text(
        "\\documentclass[10pt]{article}\n\\usepackage{booktabs}\n"
        f"\\setlength{{\\textwidth}}{{{TEXT_WIDTH_PT}pt}}\n\\begin{{document}}\n{inputs}\\end{{document}}\n"
    )
    result = subprocess.run(
        [pdflatex, "-interaction=nonstopmode", "-halt-on-error", document.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert result.returncode == 0, log[-3000:]
    assert "Overfull \\hbox" not in log


# ------------------------------------------------------------------------------------------------ HTML
def test_html_aligns_text_left_renders_code_and_links_every_file(tmp_path):
    first = make_run(tmp_path, "first", "demo", ["disk", "stripes"], profile="cpu", maps=True, seed=1)
    second = make_run(tmp_path, "second", "demo", ["disk", "stripes"], profile="cpu", seed=2)
    out = report.write_report([first, second], out=tmp_path / "out", wandb="disabled", quiet=True)
    page = (out / "report.html").read_text()
    assert "`" not in page  # Markdown's backticks became <code>
    assert "<code>tfsearch report</code>" in page
    # the training table: text columns (run, dataset, category, model, split) left, numbers right
    section = page[page.index("<h3 id='training'>") :]
    section = section[: section.index("</section>")]
    left = set(re.findall(r"#T_training \.col(\d+) \{\s*text-align: left;", section))
    headers = re.findall(r'class="col_heading level0 col(\d+)" >([^<]*)</th>', section)
    text = {name for index, name in headers if index in left}
    assert text == {"run", "dataset", "category", "model", "split"}
    # the single-configuration table of the two runs: run and category left
    section = page[page.index("<h3 id='single_config_demo'>") :]
    assert re.search(r"#T_single_config_demo \.col0 \{\s*text-align: left;", section)
    # every listed file is a link to a file that is there
    files = page[page.index("<section id='files'>") :]
    links = re.findall(r"<li><a href='([^']+)'>([^<]+)</a></li>", files)
    assert links and all(href == name and (out / href).exists() for href, name in links)
    listed = re.findall(r"<li>", files)
    assert len(listed) == len(links)
    assert {href for href, _ in links} >= {
        "report.md",
        "tables/paper_aupro_demo.csv",
        "figures/kernel_sensitivity.png",
    }
    assert "- [tables/paper_aupro_demo.csv](tables/paper_aupro_demo.csv)" in (out / "report.md").read_text()


def test_the_kernel_figures_points_have_integer_n(tmp_path):
    run = make_run(tmp_path, "demo", "demo", ["disk"], profile="cpu", maps=True)
    out = report.write_report([run], out=tmp_path / "out", wandb="disabled", quiet=True)
    lines = (out / "figures" / "kernel_sensitivity.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["dataset", "run", "kernel"]
    assert [line.split(",")[2] for line in lines[1:]] == [str(n) for n in KERNELS]
    lam = read_csv(out / "figures" / "lambda_sensitivity.csv")
    assert lam[1]["lam"] == "0.05"
