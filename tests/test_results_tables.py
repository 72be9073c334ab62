"""Every generated table in README.md and docs/results.md equals what `scripts/results_tables.py` computes from the
run summaries committed in docs/results/data/ (issue 23: published numbers regenerate from committed files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results_tables.py"


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True,
                          text=True, timeout=300)


def test_the_docs_tables_equal_their_data():
    r = run_check(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    n = int(r.stdout.strip().splitlines()[-1].split()[0])
    assert n >= 2  # the README's demo table and §1's tables at least


def test_a_changed_digit_is_caught(tmp_path):
    """Copy the docs and their data; change one published number: the check fails and shows the line."""
    for rel in ("README.md", "docs/results.md", "docs/results/data"):
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    readme = tmp_path / "README.md"
    text = readme.read_text()
    start = text.index("<!-- results-table: demo main -->")
    row = text.index("| sft-antiop (seed 0)", start)
    end = text.index("\n", row)
    assert end < text.index("<!-- /results-table -->", start)  # the row is the demo table's
    line = text[row:end]
    changed = line.replace("1.7", "1.8", 1)
    assert changed != line
    readme.write_text(text[:row] + changed + text[end:])
    r = run_check(tmp_path)
    assert r.returncode == 1
    assert "-" + changed in r.stdout and "+" + line in r.stdout
