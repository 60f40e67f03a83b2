"""The paper tables as LaTeX a paper can use as it is: booktabs, set at 8 pt and never scaled.

A table with many categories is wider than a one-column page: MVTec AD's 15 categories and the Average,
at 8 pt, take about 500 pt where LNCS (ECCV's format) gives 345 pt. Scaling it to the text width would set
it at about 4.4 pt. Instead the columns are split into panels stacked one under the other, each with its
own header row and the same row labels (Carpet … Capsule above, Hazelnut … Average below): as few panels as
keep the table within `TEXT_WIDTH_PT`, estimated from Computer Modern's 8 pt glyph widths (`text_width`,
within 2 % of what pdflatex sets).
Each column's best value among ours and the published row is bold.

The caption is the table's title and its notes: what the numbers are; what a user could do about a note
(`Table.advice`) stays in report.md.
"""

from __future__ import annotations

import math
import re

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
_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip
_SYMBOLS = {"λ": r"$\lambda$", "Δ": r"$\Delta$", "−": "$-$", "±": r"$\pm$", "…": r"\dots{}"}


def text_width(text: str, bold: bool = False) -> float:
    """The width in pt of `text` set at FONT_PT in Computer Modern (an estimate within a few percent)."""
    em = sum(_ROMAN.get(c, UPPER if c.isupper() else WIDE) for c in text)
    return em * FONT_PT * (BOLD if bold else 1.0)


def escape(text: str) -> str:
    """Text for LaTeX: its special characters escaped, λ, Δ, − and ± as LaTeX writes them."""
    text = "".join(_ESCAPES.get(c, c) for c in str(text))
    for symbol, command in _SYMBOLS.items():
        text = text.replace(symbol, command)
    return text


def _cells(table: Table) -> dict[str, list[str]]:
    """Each row's cells as shown (one decimal, Δ with its sign, a minus sign rather than a hyphen), NaN as
    an empty cell."""
    frame = table.frame
    shown = {}
    for row in frame.index:
        spec = table.row_formats.get(row)
        shown[row] = [
            ""
            if math.isnan(value)
            else (spec or table.formats.get(column, "{}")).format(value).replace("-", "−")
            for column, value in zip(frame.columns, frame.loc[row].astype(float), strict=True)
        ]
    return shown


def _bold(table: Table, shown: dict[str, list[str]]) -> set[tuple[str, int]]:
    """(row, column) of each column's best value as shown among `best_rows` (ties all bold)."""
    best = set()
    rows = [r for r in table.best_rows if r in shown]
    for index in range(len(table.frame.columns)):
        values = {r: float(shown[r][index].replace("−", "-")) for r in rows if shown[r][index]}
        if len(values) > 1:
            top = max(values.values())
            best |= {(r, index) for r, v in values.items() if v == top}
    return best


def _label(row: str) -> str:
    return short_source(row)


def panels(table: Table) -> list[list[int]]:
    """The column indices of each panel: as few panels as keep the table within TEXT_WIDTH_PT."""
    shown = _cells(table)
    headers = [str(c) for c in table.frame.columns]
    label = max(text_width(_label(r)) for r in shown) + TABCOLSEP_PT

    def width(index: int) -> float:
        cells = [text_width(cells[index], bold=True) for cells in shown.values()]
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


def table_latex(table: Table) -> str:
    """A booktabs `table` at 8 pt (`\\usepackage{booktabs}`), in panels where one row of columns would be
    wider than a one-column page; in each column the best of ours and the published value is bold."""
    shown = _cells(table)
    bold = _bold(table, shown)
    chunks = panels(table)
    widest = max(len(chunk) for chunk in chunks)
    lines = [r"\toprule"]
    for number, chunk in enumerate(chunks):
        if number:
            lines.append(r"\midrule[\heavyrulewidth]")
        padding = " &" * (widest - len(chunk))
        header = " & ".join(escape(table.frame.columns[i]) for i in chunk)
        lines += [f" & {header}{padding} \\\\", r"\midrule"]
        for row, cells in shown.items():
            values = [
                rf"\textbf{{{escape(cells[i])}}}" if (row, i) in bold else escape(cells[i]) for i in chunk
            ]
            lines.append(f"{escape(_label(row))} & {' & '.join(values)}{padding} \\\\")
    lines.append(r"\bottomrule")
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
            f"\\begin{{tabular}}{{@{{}}l{'r' * widest}@{{}}}}",
            *lines,
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )
