"""Analysis of per-token gradient traces: metrics, figures, the per-run report and cross-run comparison.

Reads traces from disk through `tokensft.tracing.schema` only; never loads a model (decoded tokens are in the trace
metadata). Entry points: `analyze_run` (`tokensft trace analyze`) and `compare_runs` (`tokensft trace compare`).
Definitions of every metric and how to read every figure: docs/analysis.md.
"""

from tokensft.analysis.analyze import analyze_run
from tokensft.analysis.compare import compare_runs, comparison_table, table_csv, table_markdown
from tokensft.analysis.load import RunData, display_piece, load_run, parse_module_name
from tokensft.analysis.metrics import (
    autocorrelation,
    gini,
    lorenz_curve,
    opposing_fraction,
    pearson,
    rankdata,
    scheme_agreement,
    share_for_mass,
    spearman,
)
from tokensft.analysis.summary import compute_summary

__all__ = [
    "analyze_run",
    "compare_runs",
    "comparison_table",
    "table_markdown",
    "table_csv",
    "load_run",
    "RunData",
    "compute_summary",
    "display_piece",
    "parse_module_name",
    "gini",
    "share_for_mass",
    "lorenz_curve",
    "opposing_fraction",
    "pearson",
    "spearman",
    "rankdata",
    "autocorrelation",
    "scheme_agreement",
]
