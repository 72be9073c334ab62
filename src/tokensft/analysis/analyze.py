"""`analyze_run`: a run's traces -> summary.json, one PNG + PDF per analysis, and a self-contained report.html."""

from __future__ import annotations

import logging
import os
import traceback
import warnings
from pathlib import Path

from tokensft.analysis.figures import ANALYSES, SkipAnalysis, render
from tokensft.analysis.load import load_run
from tokensft.analysis.report import atomic_write, run_report_html, write_json
from tokensft.analysis.summary import compute_summary, premise_summary, to_jsonable

logger = logging.getLogger(__name__)

DEFAULT_OUT = "analysis"  # RUN_DIR/analysis/


def analyze_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    formats: tuple[str, ...] = ("png", "pdf"),
    name: str | None = None,
) -> dict:
    """Analyse the per-token gradient traces of one run and write the report.

    Reads `run_dir/traces/` (format: `tokensft.tracing.schema`; torn or unreadable trace files are skipped with a
    warning), never loads a model. Writes into `out_dir` (default `run_dir/analysis/`), each file atomically:
    `summary.json` (headline table per quantity and every figure's data; NaN as null), `NN_slug.png` / `.pdf` per
    analysis (16: the reference study's 14 plus loss vs. alignment and scheme agreement), `report.html` (figures
    embedded, headline table, a reading guide per figure). Analyses the trace cannot support (e.g. no per-layer
    arrays, only one quantity traced) are listed as skipped with the reason.

    Args:
        run_dir: training output directory holding `traces/`.
        out_dir: output directory; created if needed.
        progress: tqdm bar over trace files.
        formats: figure formats written besides the PNG embedded in the report (subset of png, pdf).
        name: run name shown in the report (default: the directory name).

    Returns:
        The summary (as written to summary.json), with `figures`: [{number, slug, title, files, skipped}].

    Raises:
        FileNotFoundError: no `traces/` directory in `run_dir`.
        ValueError: no readable trace step, or malformed trace content (names the file and sequence).

    Source: the reference study's 14 analyses and headline metrics; analyses 15-16 are ours.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_OUT
    data = load_run(run_dir, name=name, progress=progress)
    summary = compute_summary(data)
    premise = premise_summary(run_dir)
    if premise is not None:  # a --log_premise run: how well high loss detects the truly opposing tokens
        summary["premise"] = premise
    figures = []
    for a in ANALYSES:
        entry = {"number": a.number, "slug": a.slug, "title": a.title, "guide": a.guide, "files": [], "skipped": None}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fig = a.draw(summary, data)
                png = render(fig, "png")
                blobs = {fmt: (png if fmt == "png" else render(fig, fmt)) for fmt in formats}
        except SkipAnalysis as e:
            entry["skipped"] = str(e)
        except Exception as e:  # noqa: BLE001 - one broken figure must not lose the rest of the report
            warnings.warn(f"analysis ({a.number}) {a.title} failed: {e!r}\n{traceback.format_exc()}", stacklevel=2)
            entry["skipped"] = f"failed: {type(e).__name__}: {e}"
        else:
            entry["png"] = png
            for fmt, blob in blobs.items():
                atomic_write(out / f"{a.stem}.{fmt}", blob)
                entry["files"].append(f"{a.stem}.{fmt}")
        figures.append(entry)
    summary["figures"] = [{k: v for k, v in f.items() if k not in ("png", "guide")} for f in figures]
    write_json(out / "summary.json", summary)
    atomic_write(out / "report.html", run_report_html(summary, figures))
    logger.info("wrote %s", out / "report.html")
    return to_jsonable(summary)
