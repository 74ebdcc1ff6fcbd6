"""Every example in the package's docstrings is a doctest that pytest runs.

`pyproject.toml` runs pytest with `--doctest-modules` over `keras_bptt/`, so
a `>>>` example is executed and its output checked. An example written any
other way -- a fenced ```python block, or an "Example:" section of plain
code -- is never run and can silently go stale. These tests keep such
examples out, and check that doctest really finds every `>>>` line.

Command-line examples stay text (in a plain ``` fence), beside a `>>>` one;
fences without a language (formulas, recursions) are not examples.
"""

import ast
import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_bptt"

# A fenced block that declares Python: ```python, ```py, ```pycon.
PYTHON_FENCE = re.compile(r"^[ \t]*```[ \t]*(python3?|py|pycon)\b", re.M | re.I)
# A Google-style section heading: "Example:", "Examples:", "Example (...):",
# possibly continued on the next lines until the colon.
EXAMPLE_HEADING = re.compile(r"^([ \t]*)Examples?\b(?=\s*[(:])")
# Any section heading ("Args:", "Returns:", "Call arguments:") ends a section.
SECTION_HEADING = re.compile(r"^([ \t]*)[A-Z][A-Za-z ]*(\(.*\))?:[ \t]*$")


def _source_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _docstrings(path):
    """`(qualified name, line, docstring)` of every docstring in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def visit(node, prefix):
        docstring = ast.get_docstring(node, clean=False)
        name = prefix or "<module>"
        if docstring:
            found.append((name, getattr(node, "lineno", 1), docstring))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}.{child.name}" if prefix else child.name)

    visit(tree, "")
    return found


def _example_sections(docstring):
    """The text of each "Example" section of `docstring`."""
    lines = docstring.splitlines()
    sections = []
    for i, line in enumerate(lines):
        heading = EXAMPLE_HEADING.match(line)
        if not heading:
            continue
        indent = len(heading.group(1).expandtabs())
        body = [line]
        for following in lines[i + 1:]:
            other = SECTION_HEADING.match(following)
            if other and len(other.group(1).expandtabs()) <= indent:
                break
            body.append(following)
        sections.append("\n".join(body))
    return sections


def _problems(path, root=ROOT):
    relative = path.relative_to(root)
    problems = []
    for name, line, docstring in _docstrings(path):
        where = f"{relative}:{line} {name}"
        if PYTHON_FENCE.search(docstring):
            problems.append(f"{where}: a fenced Python block (write it as `>>>` lines)")
        for section in _example_sections(docstring):
            if ">>>" not in section:
                heading = section.splitlines()[0].strip()
                problems.append(f"{where}: {heading!r} section without `>>>` lines")
    return problems


def test_docstring_examples_are_doctests():
    problems = [p for path in _source_files() for p in _problems(path)]
    assert not problems, (
        "Docstring examples that pytest --doctest-modules would not run:\n  "
        + "\n  ".join(problems)
    )


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _prompts(docstring):
    return sum(1 for line in docstring.splitlines() if line.lstrip().startswith(">>>"))


@pytest.mark.parametrize(
    "path",
    [p for p in _source_files() if ">>>" in p.read_text(encoding="utf-8")],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_doctest_finds_every_example(path):
    """A `>>>` line doctest does not collect (in a nested function's
    docstring, say) is as unrun as a fenced block."""
    written = sum(_prompts(docstring) for _, _, docstring in _docstrings(path))
    module = importlib.import_module(_module_name(path))
    found = sum(
        len(test.examples) for test in doctest.DocTestFinder().find(module)
    )
    assert found == written


def test_pytest_runs_the_docstring_examples():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"
    ]
    assert "--doctest-modules" in options["addopts"].split()
    assert "keras_bptt" in options["testpaths"]


def test_the_checks_see_unrun_examples(tmp_path):
    """The checks themselves: each form of unrun example is reported."""
    source = tmp_path / "sample.py"
    source.write_text(
        '"""Module.\n\n* `a` -- a module list, no example.\n"""\n\n'
        "def fenced():\n"
        '    """Doc.\n\n    Example:\n\n    ```python\n    fenced()\n    ```\n    """\n\n'
        "def plain():\n"
        '    """Doc.\n\n    Example (plain code):\n\n        plain()\n\n'
        '    Returns:\n        None.\n    """\n\n'
        "def shell_only():\n"
        '    """Doc.\n\n    Example:\n\n    ```\n    $ keras-bptt plan\n    ```\n    """\n\n'
        "def good():\n"
        '    """Doc.\n\n    Examples:\n\n    >>> good()\n\n'
        '    ```\n    $ keras-bptt plan\n    ```\n\n    Returns:\n        None.\n    """\n'
    )
    problems = [p.split(": ", 1)[0].split()[-1] for p in _problems(source, tmp_path)]
    assert problems == ["fenced", "fenced", "plain", "shell_only"]

