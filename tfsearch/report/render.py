"""Each table as CSV, Markdown and HTML through pandas (`to_csv`, `to_markdown`, `Styler.to_html`; the
LaTeX of the paper tables is `tfsearch.report.latex`), and the two documents, report.md and a self-contained
report.html: numbers right-aligned, text left-aligned, Markdown's inline code and links rendered in the
HTML."""

from __future__ import annotations

import base64
import html
import re

import pandas as pd
from pandas.io.formats.style import Styler

from tfsearch.report.tables import Table

# a cell that reads as a number (right-aligned): 97.3, -0.4, +1.2, −0.4, 97.00 ± 0.50
_NUMBER = re.compile(r"^[+\-−]?\d")


def _formatter(table: Table) -> dict:
    """The formats of the table's numeric columns (the others are text)."""
    return {c: f for c, f in table.formats.items() if c in table.frame.columns}


def _text_frame(table: Table) -> pd.DataFrame:
    """Every cell as the text the documents show; NaN as an empty cell."""
    frame = table.frame.astype(object).copy()
    for column, spec in _formatter(table).items():
        frame[column] = [("" if pd.isna(v) else spec.format(v)) for v in table.frame[column]]
    for row, spec in table.row_formats.items():
        frame.loc[row] = [("" if pd.isna(v) else spec.format(v)) for v in table.frame.loc[row]]
    return frame.fillna("")


def flat_columns(columns: pd.Index) -> list[str]:
    if isinstance(columns, pd.MultiIndex):
        return [" ".join(p for p in parts if p) for parts in columns]
    return [str(c) for c in columns]


def table_csv(table: Table) -> str:
    """Paper tables as shown (one decimal); the others at full precision, NaN as an empty cell."""
    frame = table.frame.copy()
    frame.columns = flat_columns(frame.columns)
    if table.paper:
        frame = frame.round(1)
    return frame.to_csv(index=frame.index.name is not None or table.paper, index_label=frame.index.name or "")


def numeric_columns(table: Table) -> list[bool]:
    """Per column whether it holds numbers (right-aligned) or text (left-aligned): a formatted or numeric
    column, or one whose every shown cell reads as a number (`97.00 ± 0.50`)."""
    shown = _text_frame(table)

    def numeric(column) -> bool:
        values = table.frame[column]
        if column in _formatter(table) or (
            pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        ):
            return True
        cells = [str(v) for v in shown[column] if str(v)]
        return bool(cells) and all(_NUMBER.match(c) for c in cells)

    return [numeric(column) for column in table.frame.columns]


def _shows_index(table: Table) -> bool:
    return table.paper or table.frame.index.name is not None


def table_markdown(table: Table) -> str:
    frame = _text_frame(table)
    frame.columns = flat_columns(frame.columns)
    align = (["left"] if _shows_index(table) else []) + [
        "right" if n else "left" for n in numeric_columns(table)
    ]
    text = frame.to_markdown(index=_shows_index(table), colalign=align, disable_numparse=True)
    notes = "".join(f"\n{note}  " for note in [*table.notes, *table.advice])
    return f"### {table.title}\n\n{text}\n{notes}\n"


def _styler(table: Table, bold_props: str) -> Styler:
    styler = table.frame.style.format(_formatter(table), na_rep="")
    for row, spec in table.row_formats.items():
        styler = styler.format(spec, subset=pd.IndexSlice[[row], :], na_rep="")
    if table.best_rows:
        styler = styler.highlight_max(
            axis=0, subset=pd.IndexSlice[list(table.best_rows), :], props=bold_props
        )
    return styler


def table_html(table: Table) -> str:
    """The table with its numbers right-aligned and its text columns left-aligned, and its notes."""
    styler = _styler(table, "font-weight:bold").set_table_attributes("class='report'")
    text = [c for c, n in zip(table.frame.columns, numeric_columns(table), strict=True) if not n]
    if text:
        left = [{"selector": "", "props": "text-align:left"}]
        styler = styler.set_table_styles(dict.fromkeys(text, left), overwrite=False)
    if not _shows_index(table):
        styler = styler.hide(axis="index")
    notes = "".join(f"<p class='note'>{inline_html(n)}</p>" for n in [*table.notes, *table.advice])
    body = styler.to_html(table_uuid=re.sub(r"[^A-Za-z0-9_-]", "-", table.key))
    return (
        f"<section><h3 id='{html.escape(table.key)}'>{inline_html(table.title)}</h3>{body}{notes}</section>"
    )


def inline_html(text: str) -> str:
    """Escaped text with Markdown's inline code (`x`) as <code> and its links ([text](href)) as <a>."""
    escaped = html.escape(text, quote=True)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", escaped)


def comparison_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    return pd.DataFrame(rows, columns=list(columns)).to_csv(index=False)


# ------------------------------------------------------------------------------------------ documents
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table.report{border-collapse:collapse;margin:.5em 0;font-size:13px}
table.report th,table.report td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}
table.report thead th{border-bottom:2px solid #444;background:#f6f6f6}
table.report thead th[colspan]{text-align:center}
table.report tbody th{text-align:left}
code{font-family:ui-monospace,monospace;font-size:.92em;background:#f3f3f3;padding:0 .25em;border-radius:3px}
.note{font-size:12px;color:#555;margin:.2em 0}
.missing{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}
figure{margin:1em 0}
figure img{max-width:min(100%,860px);border:1px solid #eee}
figcaption{font-size:12px;color:#555}
"""


Sections = list[tuple[str, list[str]]]  # (heading, bullet lines)


def markdown_document(
    title: str, before: Sections, tables: list[Table], figures: dict[str, str], after: Sections
) -> str:
    """`before` and `after` the tables and figures; `figures`: name -> caption."""

    def bullets(sections: Sections) -> list[str]:
        return [
            text
            for heading, lines in sections
            for text in (f"## {heading}", "", *(f"- {x}" for x in lines), "")
        ]

    parts = [f"# {title}", "", *bullets(before), "## Tables", ""] + [table_markdown(t) for t in tables]
    parts += ["## Figures", ""]
    for name, text in figures.items():
        parts += [f"![{name}](figures/{name}.png)", "", text, ""]
    return "\n".join(parts + bullets(after))


def _html_sections(sections: Sections) -> list[str]:
    out = []
    for heading, lines in sections:
        items = "".join(f"<li>{inline_html(line)}</li>" for line in lines)
        css = " class='missing'" if heading == "Missing" else ""
        anchor = re.sub(r"[^a-z0-9]+", "-", heading.lower())
        out.append(f"<section{css} id='{anchor}'><h2>{html.escape(heading)}</h2><ul>{items}</ul></section>")
    return out


def html_document(
    title: str,
    before: Sections,
    tables: list[Table],
    figures: dict[str, str],
    after: Sections,
    figure_png: dict[str, bytes],
) -> str:
    """Self-contained: the figures are embedded as data URIs."""
    body = _html_sections(before)
    body.append("<h2>Tables</h2>" + "".join(table_html(t) for t in tables) + "<h2>Figures</h2>")
    body += [
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(figure_png[name]).decode('ascii')}'>"
        f"<figcaption>{inline_html(text)}</figcaption></figure>"
        for name, text in figures.items()
    ] or ["<p>No figure (see Missing).</p>"]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(body + _html_sections(after))}</body></html>\n"
    )
