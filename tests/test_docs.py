"""The developer documentation in docs/ is complete and self-contained."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Notes kept outside the repository, which the project must not cite.
_OUTSIDE_NOTES = re.compile(r"paper-notes|tf-pitfalls|fused-planning|\.\./shared|shared/\S*\.md")
# Absolute paths of a developer's machine (the system's temporary directory,
# which docstring examples may write to, is not one of them).
_OUTSIDE_PATHS = re.compile(r"(?<![\w.])/(?:work|home|root|Users|mnt|srv)/")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _text_files(folder):
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".py", ".md", ".txt", ".cfg", ".toml")]


@pytest.mark.parametrize("folder", ["keras_bptt", "docs"])
def test_no_outside_notes_or_paths_are_cited(folder):
    offending = []
    for path in _text_files(ROOT / folder):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _OUTSIDE_NOTES.search(line) or _OUTSIDE_PATHS.search(line):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)


def test_tests_cite_docs_not_outside_notes():
    offending = [
        str(path.relative_to(ROOT)) for path in _text_files(ROOT / "tests")
        if path.name != "test_docs.py" and _OUTSIDE_NOTES.search(path.read_text())
    ]
    assert not offending


def test_every_page_of_the_index_exists_and_every_page_is_indexed():
    linked = {m.group(1) for m in _LINK.finditer((DOCS / "README.md").read_text())}
    assert {"architecture.md", "algorithm.md", "cost-model.md", "executor.md",
            "private-apis.md"} <= linked
    for page in linked:
        assert (DOCS / page).is_file(), page
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages <= linked, pages - linked


def test_links_between_pages_resolve_inside_the_repository():
    for page in DOCS.glob("*.md"):
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), (page.name, target)
            assert resolved.exists(), (page.name, target)


def _slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page):
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines()
            if re.match(r"#{1,6} ", line)}


_LINK_WITH_ANCHOR = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md", *sorted(
    str(p.relative_to(ROOT)) for p in DOCS.glob("*.md"))])
def test_links_images_and_anchors_resolve_inside_the_repository(page):
    page = ROOT / page
    for target, anchor in _LINK_WITH_ANCHOR.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        resolved = (page.parent / target).resolve() if target else page
        assert resolved.is_relative_to(ROOT), (page.name, target)
        assert resolved.exists(), (page.name, target)
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), (page.name, target, anchor)


def test_readme_cites_nothing_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    offending = [line for line in text.splitlines()
                 if _OUTSIDE_NOTES.search(line) or _OUTSIDE_PATHS.search(line)]
    assert not offending


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^# Tests\n(.+)$", readme, re.MULTILINE).group(1)
    assert command == (
        'pip install -e ".[test]" && python -m pytest -q -n 2 --dist loadscope'
        " && KERAS_BACKEND=jax python -m pytest -q -n 2 tests/jax_backend")
    pytest_commands = command.split(" && ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.endswith("&& " + pytest_commands), ci


def test_benchmarks_page_quotes_the_recorded_results():
    """Every result file is on the benchmarks page, and every figure exists."""
    text = (DOCS / "benchmarks.md").read_text()
    for result in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"`{result.stem}" in text, result.name
        assert result.with_suffix(".png").is_file(), result.name


def test_docs_pages_cited_in_code_and_tests_exist():
    cited = set()
    for folder in ("keras_bptt", "tests"):
        for path in _text_files(ROOT / folder):
            cited.update(re.findall(r"docs/([\w-]+\.md)", path.read_text()))
    missing = sorted(page for page in cited if not (DOCS / page).is_file())
    assert not missing


def test_the_changelog_opens_with_this_version_and_is_linked():
    import keras_bptt

    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d\d-\d\d$", text, re.M)
    assert versions and versions[0] == keras_bptt.__version__, versions
    numbers = [tuple(map(int, v.split("."))) for v in versions]
    assert numbers == sorted(numbers, reverse=True), versions
    assert "](CHANGELOG.md)" in (ROOT / "README.md").read_text()
    assert "](../CHANGELOG.md)" in (DOCS / "architecture.md").read_text()


def test_the_removed_module_paths_are_listed_once_in_the_changelog():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    removed = re.findall(r"^\s*\| `keras_bptt\.(\w+)` \|", changelog, re.M)
    assert removed
    names = "|".join(removed)
    # `keras_bptt.<old>...` or `from keras_bptt import <old>`.
    pattern = re.compile(rf"keras_bptt\.({names})(?!\w)|from keras_bptt import .*\b({names})\b")
    files = [ROOT / "README.md", ROOT / "setup.cfg", ROOT / "pyproject.toml",
             *_text_files(DOCS), *_text_files(ROOT / "keras_bptt"),
             *_text_files(ROOT / "tests"), *_text_files(ROOT / "examples"),
             *_text_files(ROOT / "benchmarks")]
    offending = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offending, "\n".join(offending)
