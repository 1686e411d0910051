"""The README and docs: short, links that resolve inside the repository, results copied by command."""
from __future__ import annotations

import re
from pathlib import Path

from analysis.readme import main as readme_main

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_relative_link_resolves_inside_the_repository():
    for page in markdown_files():
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "#", "data:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert REPO in path.parents or path == REPO, f"{page.name}: {target} points outside the repository"
            assert path.exists(), f"{page.name}: {target} does not exist"


def test_the_readme_is_a_short_guide_whose_results_block_matches_the_generated_pages():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for needle in ("make repro", "make test", "## Layout", "## Loss-weight strategies", "dvc exp run",
                   "make ablation", "docs/results.md", "## Scaling up"):
        assert needle in readme, needle
    assert readme_main(["--readme", str(REPO / "README.md"), "--results", str(REPO / "docs/results.md"),
                        "--ablation", str(REPO / "docs/results_multispace.md"), "--check"]) == 0
