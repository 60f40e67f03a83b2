"""The documentation a newcomer walks: README.md, docs/ and bench/.

- every relative link resolves to a file or folder of the repository (the part before any `#anchor`);
- every repository path and `tfsearch.…` name written in backticks exists (a module, and the first name
  after it defined there), so a move or a rename shows up here;
- the README's "How a run flows" names each subpackage of `tfsearch/`, found on disk, once, in the order
  data flows through a run;
- the README stays short: the reference lives in docs/.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tfsearch"
README = ROOT / "README.md"
README_LIMIT = 12 * 1024  # bytes

# the order data flows through a run: data -> transfusion -> maps -> store -> run (training, selection)
# -> report -> deploy; the command line on top and the Ray/W&B plumbing beside come last
DATA_FLOW = (
    "data",
    "transfusion",
    "maps",
    "store",
    "run",
    "run/training",
    "run/selection",
    "report",
    "deploy",
    "cli",
    "infra",
)

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
# a repository path in backticks: a top-level folder of the repository, then path characters
REPO_PATH = re.compile(r"^(tfsearch|bench|tests|docs|cluster|search_spaces)/[\w./-]*$")
DOTTED = re.compile(r"^tfsearch(\.\w+)+")


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md",
            *sorted((ROOT / "bench" / "results").glob("*.md"))]  # fmt: skip


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def relative_links(text: str) -> list[str]:
    links = []
    for target in LINK.findall(CODE_SPAN.sub("", prose(text))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        links.append(target)
    return links


def subpackages() -> list[str]:
    """Folders under tfsearch/ that are packages, as paths relative to it ("run/training")."""
    return sorted(
        path.parent.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("__init__.py")
        if path.parent != PACKAGE and "__pycache__" not in path.parts
    )


def section(text: str, title: str) -> str:
    """The body of the `## title` section of a Markdown text."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def named_packages(text: str) -> list[str]:
    """The `tfsearch/NAME/` folders a text names in backticks, in order of first mention."""
    names = re.findall(r"`tfsearch/((?:\w+/)+)`", text)
    return list(dict.fromkeys(name.rstrip("/") for name in names))


@cache
def top_level_names(module_file: Path) -> frozenset[str]:
    """Names a module defines or imports at its top level (and its submodules, for a package)."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if module_file.name == "__init__.py":
        names.update(p.stem for p in module_file.parent.glob("*.py"))
        names.update(p.name for p in module_file.parent.iterdir() if (p / "__init__.py").is_file())
        if "__getattr__" in names:  # lazy attributes: the names its __getattr__ compares against
            names.update(re.findall(r"name == \"(\w+)\"", module_file.read_text(encoding="utf-8")))
    return frozenset(names)


def dotted_problem(name: str) -> str | None:
    """Why `tfsearch.a.b.c` names nothing, or None: the longest module prefix must exist, and the next part
    must be defined in it (what follows that is an attribute of a class and is not checked)."""
    parts = name.split(".")
    if parts[1] == "search_spaces":
        return None if (ROOT / "search_spaces" / "__init__.py").is_file() else "search_spaces/ is missing"
    for end in range(len(parts), 0, -1):
        folder = ROOT.joinpath(*parts[:end])
        module = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
        if module.is_file():
            break
    else:
        return "no such module"
    if end == len(parts):
        return None
    if parts[end] not in top_level_names(module):
        return f"{parts[end]!r} is not defined in {module.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("document", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document):
    missing = []
    for target in relative_links(document.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0]
        if path and not (document.parent / path).exists():
            missing.append(target)
    assert not missing, f"{document.relative_to(ROOT)}: links to missing files: {missing}"


@pytest.mark.parametrize("document", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_and_modules_exist(document):
    text = document.read_text(encoding="utf-8")
    problems = []
    for span in CODE_SPAN.findall(text):
        for word in span.split():
            word = word.strip(",;:()")
            if REPO_PATH.match(word) and "*" not in word and not (ROOT / word).exists():
                problems.append(f"{word}: no such path")
            match = DOTTED.match(word)
            if match and (problem := dotted_problem(match.group(0))):
                problems.append(f"{match.group(0)}: {problem}")
    assert not problems, f"{document.relative_to(ROOT)}: {problems}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for t in relative_links(README.read_text())}
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
    unlinked = [p.relative_to(ROOT).as_posix() for p in pages if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_how_a_run_flows_names_every_subpackage_in_data_flow_order():
    named = named_packages(section(README.read_text(encoding="utf-8"), "How a run flows"))
    on_disk = subpackages()
    assert set(named) == set(on_disk), (
        f"'How a run flows' names {sorted(named)}; tfsearch/ has the subpackages {on_disk}: name each new "
        "one in the README (and in DATA_FLOW here), drop the ones gone"
    )
    assert set(DATA_FLOW) == set(on_disk), f"DATA_FLOW {DATA_FLOW} differs from tfsearch/'s {on_disk}"
    assert named == list(DATA_FLOW), f"'How a run flows' lists {named}, data flows {list(DATA_FLOW)}"


def test_readme_stays_short():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move detail to docs/"


def test_the_checks_can_fail():
    """The helpers find what is wrong in a made-up page, so a passing run means something."""
    page = (
        "[ok](README.md) [gone](docs/none.md#x) [web](https://example.org) [here](#top) `[no](code.md)`\n"
        "```\n[code](nowhere.md)\n```\n"
    )
    assert relative_links(page) == ["README.md", "docs/none.md#x"]
    flow = (
        "## How a run flows\n1. `tfsearch/maps/` then `tfsearch/data/`, `tfsearch/run/results.py`,"
        " `tfsearch/maps/`\n## Next\n`tfsearch/cli/`\n"
    )
    assert named_packages(section(flow, "How a run flows")) == ["maps", "data"]
    assert dotted_problem("tfsearch.maps.metrics.evaluate") is None
    assert dotted_problem("tfsearch.maps.metrics.no_such_function") is not None
    assert dotted_problem("tfsearch.no_such_module") is not None
    assert dotted_problem("tfsearch.Detector") is None
