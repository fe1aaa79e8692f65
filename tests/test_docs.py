"""The README and the pages under docs/ stay navigable: every relative link (and #anchor) resolves, every page is
linked from the README, and the README stays a first screen plus an overview, opening with its two commands."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 350
# The README opens with these two commands, byte for byte: .ci/run runs the second (tests/test_ci_script.py).
README_OPENING = (
    "# Connito\n\n```bash\n"
    'python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[test]" '
    "&& .venv/bin/connito quickstart\n```\n\n```bash\n"
    'python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[test]" '
    '&& .venv/bin/pytest -m "not slow"\n```\n\n'
)

FENCED_BLOCK = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?)\s*#*\s*$", re.M)


def _prose(path: Path) -> str:
    """The page without its fenced code blocks (a `[x](y)` inside code is not a link)."""
    return FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped except '-' and '_', spaces to '-', repeats get -1, -2."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(_prose(path)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for link in _relative_links(page):
            target_path, _, anchor = link.partition("#")
            target = (page.parent / target_path).resolve() if target_path else page
            where = f"{page.relative_to(REPO)}: ({link})"
            if not target.exists():
                broken.append(f"{where}: no file {target_path}")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{where}: {target.relative_to(REPO)} has no heading #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_checker_sees_links_and_anchors():
    """Guards the test above against passing on nothing: the README links each page, with an anchor somewhere."""
    links = _relative_links(README)
    assert "docs/look.md" in links and "benchmarks/RESULTS.md" in links
    assert "quickstart-result" in _anchors(README)
    assert any("#" in link for page in PAGES for link in _relative_links(page))


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in _relative_links(README)}
    orphans = [str(p.relative_to(REPO)) for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_readme_stays_short_and_opens_with_its_two_commands():
    text = README.read_text(encoding="utf-8")
    n_lines = len(text.splitlines())
    assert n_lines < README_MAX_LINES, f"README.md has {n_lines} lines; move detail into a page under docs/"
    assert text.startswith(README_OPENING)
