"""Every repository file the README links to or names under ``bench/results/`` exists.

Plots in ``bench/results/`` are git-ignored and committed one by one (``git add -f``), so a
plot the README shows can be present in a working tree and missing from every clone; CI runs
on a clean clone, where this test then fails.
"""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

_LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown link / image targets
_RESULT = re.compile(r"\bbench/results/[A-Za-z0-9_.-]+\.(?:png|csv|md|json)\b")  # named result files


def referenced_paths(text: str) -> set[str]:
    """Relative file paths of ``text``'s links and its ``bench/results/`` file names."""
    paths = set()
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):  # URLs, anchors
            continue
        paths.add(target.split("#", 1)[0])
    paths.update(_RESULT.findall(text))
    return {p for p in paths if p}


def test_referenced_paths_finds_links_and_result_names():
    text = ("![plot](bench/results/a.png) [doc](docs/x.md#part) [web](https://example.com) [here](#top)\n"
            "rows in `bench/results/b.csv`, curves: bench/results/c_d.png.")
    assert referenced_paths(text) == {"bench/results/a.png", "docs/x.md", "bench/results/b.csv",
                                      "bench/results/c_d.png"}


def test_readme_references_exist():
    with open(README, encoding="utf-8") as fh:
        paths = referenced_paths(fh.read())
    assert any(p.endswith(".png") for p in paths)  # the README shows plots: the parsing found them
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, (f"README.md names files that are not in the repository: {missing} "
                         "(bench/results/*.png is git-ignored: commit a plot with `git add -f`)")
