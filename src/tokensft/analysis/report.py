"""Self-contained HTML report (figures embedded as base64 PNG) and atomic file output."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

from tokensft.analysis.load import QUANTITY_LABELS
from tokensft.analysis.summary import summary_headline_rows, to_jsonable

from ..io import atomic_write as _atomic_write

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.92em} th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee} .guide{background:#f7f9fc;border-left:4px solid #1f77b4;padding:.5em 1em}
.skip{color:#a33} .meta{color:#555} code{background:#f3f3f3;padding:0 .2em} .tok{background:#fde2e2;font-weight:bold}
.ctx{font-family:monospace;white-space:pre-wrap}
"""

INTRO = """
<p><b>What is measured.</b> For every completion token t of the traced sequences, the tracer records a gradient
contribution g<sub>t</sub> and the total gradient G = &Sigma;<sub>s</sub> g<sub>s</sub>: its magnitude
||g<sub>t</sub>|| and its <i>alignment</i> cos(g<sub>t</sub>, G). A token with alignment &lt; 0 is <i>opposing</i>:
its gradient pulls against the update the other tokens make. Two quantities are traced:
<b>per-position (pos)</b>, the weight-gradient contribution dy<sub>t</sub>&otimes;x<sub>t</sub> at position t of
the traced (LoRA) layers, the reference study's quantity; and <b>per-token-loss (tokloss)</b>, the gradient of the
token's own loss &nabla;l<sub>t</sub>, which is what the token-weighting schemes rescale.</p>
<p>Gini, tokens-for-80% and the two correlations are computed within each trace step and averaged over steps
(gradient scales change during training); fractions and means of alignment pool all completion tokens of all
steps. Definitions: <code>docs/analysis.md</code>.</p>
"""


TABLE_GUIDE = """
<p class='guide'><b>How to read it.</b> <i>Gini</i> 0 = every token carries the same gradient magnitude, 1 = one
token carries it all; <i>tokens for 80%</i> is the smallest share of tokens holding 80% of the summed magnitude
(0.8 when equal). <i>Opposing fraction</i> near 0.5 and <i>mean alignment</i> near 0 mean the tokens largely cancel.
<i>Alignment by category</i> &lt; 0: that kind of token pulls against the update on average. <i>Pearson r</i> &lt; 0:
the largest gradients are the opposing ones. <i>Spearman &rho;</i> &lt; 0 supports the premise of topk and antiop
(high loss &rArr; opposing). <i>Scheme agreement</i>: share of opposing tokens a scheme drops / clips / down-weights
(weight &lt; 1) next to the share of aligned tokens it hits; a scheme that targets opposition has the first well above
the second. &mdash; = not recorded in this trace.</p>
"""


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` via a temporary file in the same directory and `os.replace` (never half-written)."""
    return _atomic_write(path, data)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Atomically write `obj` as indented JSON (NaN -> null)."""
    return atomic_write(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def fmt_value(key: str, v) -> str:
    """Display form of a headline value: counts with thousands separators, others 3 decimals, missing as '—'."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if key.startswith("n_"):
        return f"{int(v):,}"
    return f"{v:.3f}"


def headline_table_html(summary: dict) -> str:
    qs = summary["run"]["quantities"]
    head = "".join(f"<th>{html.escape(QUANTITY_LABELS[q])} (<code>{q}</code>)</th>" for q in qs)
    rows = []
    for key, label in summary_headline_rows(summary):
        cells = "".join(f'<td class="num">{fmt_value(key, summary["headline"][q].get(key))}</td>' for q in qs)
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def top_opposing_html(rows: list[dict]) -> str:
    out = ["<table><tr><th>#</th><th>alignment</th><th>token in context</th><th>category</th><th>loss</th>"
           "<th>step</th><th>example</th><th>opposing / traced steps</th><th>scheme weights</th></tr>"]  # fmt: skip
    for i, r in enumerate(rows, 1):
        ctx = (f'<span class="ctx">{html.escape(r["context_before"])}<span class="tok">{html.escape(r["token"])}'
               f'</span>{html.escape(r["context_after"])}</span>')  # fmt: skip
        loss = fmt_value("loss", r["loss"])
        weights = ", ".join(f"{k} {v:.2f}" for k, v in r.get("weights", {}).items())
        out.append(f'<tr><td>{i}</td><td class="num">{r["alignment"]:.3f}</td><td>{ctx}</td><td>{r["category"]}'
                   f'</td><td class="num">{loss}</td><td class="num">{r["step"]}</td>'
                   f'<td class="num">{r["example_index"]}</td>'
                   f'<td class="num">{r["steps_opposing"]}/{r["steps_traced"]}</td>'
                   f'<td>{html.escape(weights)}</td></tr>')  # fmt: skip
    out.append("</table>")
    return "".join(out)


def run_report_html(summary: dict, figures: list[dict]) -> str:
    """HTML of one run's report. `figures`: dicts with number, title, guide, png (bytes) or skipped (reason)."""
    r = summary["run"]
    steps = r["steps"]
    step_txt = f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else str(steps[0])
    missing = [f"{QUANTITY_LABELS[q]} (<code>{q}</code>)" for q in QUANTITY_LABELS if q not in r["quantities"]]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Trace analysis: {html.escape(r['name'])}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>Per-token gradient trace analysis: {html.escape(r['name'])}</h1>",
        f"<p class='meta'>run <code>{html.escape(r['run_dir'])}</code> · mode <b>{html.escape(str(r['mode']))}</b> · "
        f"{r['n_steps']} trace steps ({step_txt}) · {r['n_sequences']:,} traced sequences · "
        f"{r['n_completion_tokens']:,} completion tokens · schemes recorded: "
        f"{', '.join(r['schemes_recorded']) or 'none'}</p>",
        INTRO,
    ]
    if missing:
        parts.append(f"<p class='skip'>Not traced in this run: {', '.join(missing)}; the analyses of that quantity "
                     "are left out.</p>")  # fmt: skip
    parts += ["<h2>Headline table</h2>", headline_table_html(summary), TABLE_GUIDE]
    skipped = [f for f in figures if f.get("skipped")]
    if skipped:
        parts.append("<h2>Analyses skipped</h2><ul>")
        parts += [f"<li>({f['number']}) {html.escape(f['title'])}: {html.escape(f['skipped'])}</li>" for f in skipped]
        parts.append("</ul>")
    parts.append("<h2>Contents</h2><ol>")
    parts += [f"<li><a href='#fig{f['number']}'>{html.escape(f['title'])}</a>"
              f"{' (skipped)' if f.get('skipped') else ''}</li>" for f in figures]  # fmt: skip
    parts.append("</ol>")
    for f in figures:
        parts.append(f"<h2 id='fig{f['number']}'>({f['number']}) {html.escape(f['title'])}</h2>")
        if f.get("skipped"):
            parts.append(f"<p class='skip'>Skipped: {html.escape(f['skipped'])}</p>")
            continue
        parts.append(_img(f["png"], f["title"]))
        parts.append(f"<p class='guide'><b>How to read it.</b> {html.escape(f['guide'])}</p>")
        if f["number"] == 6:
            for q in r["quantities"]:
                rows = summary["top_opposing"].get(q) or []
                if rows:
                    parts.append(f"<h3>{html.escape(QUANTITY_LABELS[q])} (<code>{q}</code>)</h3>")
                    parts.append(top_opposing_html(rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def compare_report_html(table_md_rows: list[list[str]], names: list[str], figures: list[dict]) -> str:
    """HTML of a cross-run comparison: the metric x run table and the overlaid figures."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Trace comparison</title><style>{CSS}</style>"
        "</head><body>",
        f"<h1>Trace comparison: {html.escape(' vs. '.join(names))}</h1>",
        INTRO,
        "<h2>Metrics</h2><table><tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>",
    ]
    for row in table_md_rows:
        parts.append(f"<tr><td>{html.escape(row[0])}</td>"
                     + "".join(f'<td class="num">{html.escape(c)}</td>' for c in row[1:]) + "</tr>")  # fmt: skip
    parts.append("</table>")
    for f in figures:
        parts.append(f"<h2>{html.escape(f['title'])}</h2>")
        if f.get("skipped"):
            parts.append(f"<p class='skip'>Skipped: {html.escape(f['skipped'])}</p>")
            continue
        parts.append(_img(f["png"], f["title"]))
        parts.append(f"<p class='guide'><b>How to read it.</b> {html.escape(f['guide'])}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
