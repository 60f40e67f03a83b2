"""The paper tables as LaTeX a paper can use as it is: booktabs, set at 8 pt and never scaled.

A table with many categories is wider than a one-column page: MVTec AD's 15 categories and the Average,
at 8 pt, take about 500 pt where LNCS (ECCV's format) gives 345 pt. Scaling it to the text width would set
it at about 4.4 pt. Instead the columns are split into panels stacked one under the other, each with its
own header row and the same row labels (Carpet … Capsule above, Hazelnut … Average below): as few panels as
keep the table within `TEXT_WIDTH_PT`, estimated from Computer Modern's 8 pt glyph widths (`text_width`,
within 2 % of what pdflatex sets).
Each column's best value among ours and the published row is bold.

Each panel's tabular is pandas' (`Styler.to_latex`: booktabs rules, LaTeX escaping, the bold); the panels
are stacked in one tabular, so that they share its columns, under the caption and the font size.

The caption is the table's title and its notes: what the numbers are; what a user could do about a note
(`Table.advice`) stays in report.md.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from tfsearch.report.published import short_source
from tfsearch.report.tables import Table

TEXT_WIDTH_PT = 345.0  # LNCS's \textwidth (122 mm), the narrowest of the usual one-column formats
FONT_PT = 8.0
LEADING_PT = 10.0
TABCOLSEP_PT = 4.0
# Computer Modern's glyph widths at 8 pt (cmr8, cmbx8), in em; other glyphs count as WIDE
_ROMAN = dict(zip("abcdefghijklmnopqrstuvwxyz", (
    .531, .59, .472, .59, .472, .325, .531, .59, .295, .325, .561, .295, .885, .59, .531, .59, .561, .414,
    .419, .413, .59, .561, .767, .561, .561, .472,
), strict=True)) | dict.fromkeys("0123456789", .531) | dict.fromkeys(".,:; '|", .295) | {
    "(": .413, ")": .413, "-": .354, "+": .826, "_": .5, "−": .826, "Δ": .885, "λ": .59,
}  # fmt: skip
UPPER, WIDE = 0.84, 0.9
BOLD = 1.16  # cmbx8 against cmr8
BOLD_PROPS = "textbf:--rwrap;"  # Styler's LaTeX for a bold cell: \\textbf{value}
_SYMBOLS = {"λ": r"$\lambda$", "Δ": r"$\Delta$", "−": "$-$", "±": r"$\pm$", "…": r"\dots{}", "·": r"$\cdot$"}
# the caption is outside the Styler: these are the characters `Styler.format(escape="latex")` escapes
_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def text_width(text: str, bold: bool = False) -> float:
    """The width in pt of `text` set at FONT_PT in Computer Modern (an estimate within a few percent)."""
    em = sum(_ROMAN.get(c, UPPER if c.isupper() else WIDE) for c in text)
    return em * FONT_PT * (BOLD if bold else 1.0)


def _symbols(text: str) -> str:
    """λ, Δ, −, ± and … as LaTeX writes them, in text already escaped."""
    for symbol, command in _SYMBOLS.items():
        text = text.replace(symbol, command)
    return text


def escape(text: str) -> str:
    """Text outside the Styler (the caption) for LaTeX, escaped as `Styler.format(escape="latex")` would."""
    return _symbols("".join(_ESCAPES.get(c, c) for c in str(text)))


def _shown(table: Table) -> pd.DataFrame:
    """Each cell as shown (one decimal, Δ with its sign, a minus sign rather than a hyphen), NaN as an empty
    cell; the rows by their short labels (`supp. Table 2`)."""
    frame = table.frame.astype(float)
    cells = [
        [
            ""
            if math.isnan(value)
            else (table.row_formats.get(row) or table.formats.get(column, "{}")).format(value)
            for column, value in frame.loc[row].items()
        ]
        for row in frame.index
    ]
    shown = pd.DataFrame(cells, index=[short_source(r) for r in frame.index], columns=frame.columns.map(str))
    return shown.replace("-", "−", regex=True)


def _best(cells: pd.DataFrame) -> np.ndarray:
    """For `Styler.apply`: each column's best value as shown bold, where there are two or more (ties all
    bold)."""
    values = cells.apply(lambda column: pd.to_numeric(column.str.replace("−", "-"), errors="coerce"))
    return np.where(values.eq(values.max()) & (values.count() > 1), BOLD_PROPS, "")


def panels(table: Table) -> list[list[int]]:
    """The column indices of each panel: as few panels as keep the table within TEXT_WIDTH_PT."""
    shown = _shown(table)
    headers = list(shown.columns)
    label = max(text_width(r) for r in shown.index) + TABCOLSEP_PT

    def width(index: int) -> float:
        cells = [text_width(cell, bold=True) for cell in shown.iloc[:, index]]
        return max([text_width(headers[index]), *cells]) + 2 * TABCOLSEP_PT

    widths = [width(i) for i in range(len(headers))]
    for count in range(1, len(headers) + 1):
        size = math.ceil(len(headers) / count)
        chunks = [
            list(range(start, min(start + size, len(headers)))) for start in range(0, len(headers), size)
        ]
        # the panels share the tabular's columns: each is as wide as its widest cell in any panel
        shared = [max(widths[chunk[j]] for chunk in chunks if j < len(chunk)) for j in range(size)]
        if label + sum(shared) <= TEXT_WIDTH_PT:
            return chunks
    return chunks


def _panel(shown: pd.DataFrame, best: list[str]) -> str:
    """One panel's booktabs tabular through `Styler.to_latex`, each column's best of the `best` rows bold."""
    styler = (
        shown.style.format(_symbols, escape="latex")
        .format_index(_symbols, escape="latex", axis="index")
        .format_index(_symbols, escape="latex", axis="columns")
    )
    if best:
        styler = styler.apply(_best, axis=None, subset=pd.IndexSlice[best, :])
    return styler.to_latex(hrules=True, column_format=f"@{{}}l{'r' * len(shown.columns)}@{{}}")


def table_latex(table: Table) -> str:
    """A booktabs `table` at 8 pt (`\\usepackage{booktabs}`), in panels where one row of columns would be
    wider than a one-column page; in each column the best of ours and the published value is bold."""
    shown = _shown(table)
    best = [r for r in dict.fromkeys(map(short_source, table.best_rows)) if r in shown.index]
    tabulars = [_panel(shown.iloc[:, chunk], best).splitlines() for chunk in panels(table)]
    # one tabular of the panels' rows (the first panel is the widest), a heavy rule between two panels
    rows = [r"\toprule"]
    for number, lines in enumerate(tabulars):
        rows += [r"\midrule[\heavyrulewidth]"] * bool(number)
        rows += lines[lines.index(r"\toprule") + 1 : lines.index(r"\bottomrule")]
    rows += [r"\bottomrule", r"\end{tabular}"]
    caption = " ".join([table.title + ".", *table.notes]).replace("`", "")
    label = re.sub(r"[^A-Za-z0-9:_-]", "-", table.key)
    return "\n".join(
        [
            "% generated by `tfsearch report`; needs \\usepackage{booktabs}",
            r"\begin{table}[t]",
            r"\centering",
            f"\\caption{{{escape(caption)}}}",
            f"\\label{{tab:{label}}}",
            f"\\fontsize{{{FONT_PT:g}}}{{{LEADING_PT:g}}}\\selectfont",
            f"\\setlength{{\\tabcolsep}}{{{TABCOLSEP_PT:g}pt}}",
            tabulars[0][0],  # \begin{tabular}{@{}lrr…r@{}}
            *rows,
            r"\end{table}",
            "",
        ]
    )
