"""The docs' and the README's measured tables are the ones the committed
results file of the last full run gives (benchmarks/publish.py)."""

import os

from benchmarks import publish


def test_generated_tables_match_the_committed_results():
    data = publish.load()
    for path in publish.TARGETS:
        with open(path) as handle:
            text = handle.read()
        assert publish.MARKER.search(text), f"{path} has no generated table"
        assert publish.render(text, data) == text, (
            f"{os.path.relpath(path, publish.ROOT)} is out of date with docs/results/full_run.json: "
            "run python -m benchmarks.publish --results docs/results/full_run.json"
        )


def test_every_generated_section_renders():
    data = publish.load()
    for name, section in publish.SECTIONS.items():
        assert section(data).strip(), name
