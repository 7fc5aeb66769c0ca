"""The performance numbers in the README and in docs/performance.md are the ones
bench/report.py writes from bench/results.json: numbers are never edited by hand."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- performance -->", "<!-- /performance -->"


def test_performance_tables_match_results_json():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "README.md: performance section matches" in out.stdout, out.stdout
    assert "performance.md: performance section matches" in out.stdout, out.stdout


def test_the_readme_keeps_a_summary_and_links_the_details():
    text = README.read_text()
    section = text.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    assert BEGIN in section and END in section
    assert "](docs/performance.md)" in section
    generated = section.split(BEGIN, 1)[1].split(END, 1)[0]
    assert "| scenario | metric | ours |" in generated
    # The reasons and the narrative live in docs/performance.md.
    assert "What the comparisons showed" not in generated
    assert "Why:" not in generated


def test_docs_performance_quotes_no_figure_by_hand():
    text = DOC.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    by_hand = text.split(BEGIN, 1)[0] + text.split(END, 1)[1]
    # Commands and names may hold digits (`/v1/best`, exit codes); prose may not.
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", by_hand, flags=re.S))
    found = re.findall(r"[^\n]*\d[^\n]*", prose)
    assert not found, f"figures outside the generated part: {found}"
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert "| scenario | metric | ours |" in generated
