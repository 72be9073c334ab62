"""HTML of the token views: one `<span>` per token with an inline background colour, a tooltip and `data-*`
attributes (`data-index`, `data-value`, `data-category`, `data-role`), plus the colour legend.

Pure functions of numpy arrays and strings; the Gradio app only places the returned HTML.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from tokensft.tracing.schema import scheme_rules
from tokensft.viz.colors import NAN_RGB, css_gradient, diverging_rgb, text_rgb
from tokensft.viz.data import display_piece, fmt, scheme_name

STYLE = """<style>
.tsft-tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:14px;
  line-height:2.0;white-space:pre-wrap;word-break:break-word;padding:6px 4px;}
.tsft-tokens .tok{border-radius:3px;padding:1px 0;margin:0 1px 0 0;}
.tsft-tokens .tok.prompt{color:rgb(120,120,120)!important;font-style:italic;border-bottom:1px dashed rgb(150,150,150);}
.tsft-tokens .tok.mark{outline:2px solid rgb(17,17,17);outline-offset:-1px;font-weight:700;}
.tsft-tokens .tok:hover{outline:2px solid rgb(255,200,0);}
.tsft-tokens .role{display:inline-block;font:600 10px/1.4 ui-sans-serif,system-ui,sans-serif;letter-spacing:.06em;
  text-transform:uppercase;border-radius:3px;padding:0 4px;margin:0 4px 0 2px;vertical-align:middle;font-style:normal;}
.tsft-tokens .role.prompt{background:rgb(90,90,90);color:white;}
.tsft-tokens .role.completion{background:rgb(30,110,60);color:white;}
.tsft-legend{font:12px/1.4 ui-sans-serif,system-ui,sans-serif;display:flex;align-items:center;gap:10px;flex-wrap:wrap;
  margin:2px 0 6px 0;}
.tsft-legend .bar{width:220px;height:12px;border:1px solid rgb(180,180,180);border-radius:2px;}
.tsft-legend .ticks{display:flex;justify-content:space-between;width:222px;font-size:11px;}
.tsft-legend .sw{display:inline-block;width:14px;height:12px;border:1px solid rgb(180,180,180);vertical-align:middle;
  margin-right:3px;}
.tsft-msg{font:13px/1.5 ui-sans-serif,system-ui,sans-serif;padding:8px;border-radius:4px;background:rgb(255,244,229);
  color:rgb(120,60,0);}
.tsft-summary{font:13px/1.5 ui-sans-serif,system-ui,sans-serif;border-collapse:collapse;margin:4px 0 10px 0;}
.tsft-summary td,.tsft-summary th{border:1px solid rgb(210,210,210);padding:2px 8px;text-align:right;}
.tsft-summary th{background:rgb(245,245,245);}
.tsft-scheme h4{margin:12px 0 2px 0;font:600 14px ui-sans-serif,system-ui,sans-serif;}
</style>"""


def message_html(text: str) -> str:
    """A boxed notice (missing data, refused path, ...)."""
    return f'{STYLE}<div class="tsft-msg">{html.escape(text)}</div>'


def legend_html(vmax: float, label: str) -> str:
    """Legend of the diverging scale: a colour bar from `-vmax` to `+vmax` and the swatch of missing values."""
    return (
        f'<div class="tsft-legend" data-vmax="{vmax:.6g}"><b>{html.escape(label)}</b>'
        f'<div><div class="bar" style="background:{css_gradient()}"></div>'
        f'<div class="ticks"><span>{-vmax:.3g}</span><span>0</span><span>{vmax:.3g}</span></div></div>'
        f'<span><span class="sw" style="background:{NAN_RGB}"></span>no value (prompt / not a target)</span>'
        '<span><span class="role prompt" style="margin:0">prompt</span> tokens in grey italics</span></div>'
    )


def tooltip(rec: dict, rules: dict[str, dict] | None = None) -> str:
    """Tooltip text of a token record (see `tokensft.viz.data.token_records`): every value, one group a line.
    Scheme weights are named by `rules` (`step_scheme_rules`), else by the registry's declaration of their key."""
    lines = [f"#{rec['t']} {rec['token']!r} · {rec.get('category', '')} · {rec.get('role', '')}"]
    base = [k for k in ("loss", "p", "entropy") if k in rec]
    if base:
        lines.append("  ".join(f"{k}={fmt(rec[k])}" for k in base))
    for prefix in sorted({k.split(".")[0] for k in rec if k.startswith(("pos", "tokloss"))}):
        vals = [(k.split(".", 1)[1], rec[k]) for k in rec if k.startswith(prefix + ".")]
        lines.append(f"{prefix}: " + "  ".join(f"{n}={fmt(v)}" for n, v in vals))
    w = [(k.split(".", 1)[1], rec[k]) for k in rec if k.startswith("weight.")]
    if w:
        rules = rules if rules is not None else scheme_rules({}, [n for n, _ in w])
        lines.append("weights: " + "  ".join(f"{scheme_name(n, rules)}={fmt(v)}" for n, v in w))
    return "\n".join(lines)


def _piece_html(piece: str) -> str:
    s = display_piece(piece)
    if s == "":
        return "∅"
    return html.escape(s).replace("\n", "↵\n").replace("\t", "⇥\t")


def tokens_html(
    tokens: Sequence[str],
    values: np.ndarray,
    categories: Sequence[str],
    is_completion: np.ndarray,
    vmax: float,
    *,
    tooltips: Sequence[str] | None = None,
    marks: np.ndarray | None = None,
    metric: str = "",
    elem_class: str = "",
    skip_prompt: bool = False,
) -> str:
    """Token spans coloured by `values` on the diverging scale (without the `<style>` block and legend).

    Args:
        tokens: decoded pieces, length T.
        values: (T,) float; NaN gets the neutral `NAN_RGB`.
        categories: token categories, length T.
        is_completion: (T,) bool; prompt tokens get class `prompt` (grey italics) and a role label is put before
            each run of prompt or completion tokens, except the unsupervised template tail after the last completion
            token (the `↵` after `<|im_end|>`), which is grey without a label of its own.
        vmax: scale of the colour map (finite > 0).
        tooltips: title text per token.
        marks: (T,) bool; marked tokens get class `mark` (outlined, bold).
        metric: stored as `data-metric` of the container.
        elem_class: extra class of the container.
        skip_prompt: leave out the prompt tokens (spans keep their index `t` in `data-index`).

    Raises:
        ValueError: lengths differ, or `vmax` is not finite > 0.
    """
    T = len(tokens)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    is_completion = np.asarray(is_completion).astype(bool).reshape(-1)
    if values.shape[0] != T or is_completion.shape[0] != T or len(categories) < T:
        raise ValueError(
            f"token view: {T} tokens but {values.shape[0]} values, {is_completion.shape[0]} completion flags, "
            f"{len(categories)} categories"
        )
    if not (math.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a finite number > 0, got {vmax!r}")
    out = [f'<div class="tsft-tokens {html.escape(elem_class)}" data-metric="{html.escape(metric)}" data-vmax="{vmax:.6g}">']
    prev_role = None
    last_completion = int(np.flatnonzero(is_completion)[-1]) if is_completion.any() else T
    for t in range(T):
        v = float(values[t])
        role = "completion" if is_completion[t] else "prompt"
        if skip_prompt and role == "prompt":
            continue
        if role != prev_role and t <= last_completion:
            out.append(f'<span class="role {role}">{role}</span>')
            prev_role = role
        cls = "tok " + role + (" mark" if marks is not None and bool(marks[t]) else "")
        bg = diverging_rgb(v, vmax)
        fg = text_rgb(v, vmax)
        title = html.escape(tooltips[t], quote=True) if tooltips is not None else ""
        cat = html.escape(categories[t], quote=True)
        dv = "nan" if math.isnan(v) else f"{v:.6g}"
        out.append(
            f'<span class="{cls}" data-index="{t}" data-value="{dv}" data-category="{cat}" data-role="{role}" '
            f'style="background-color: {bg}; color: {fg};" '
            f'title="{title}">{_piece_html(tokens[t])}</span>'
        )
    out.append("</div>")
    return "".join(out)


def summary_table_html(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A small HTML table: `columns` are (key, header) pairs, values formatted with `fmt` when numeric."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = []
    for r in rows:
        cells = []
        for k, _ in columns:
            v = r.get(k, "")
            cells.append(f"<td>{fmt(v) if isinstance(v, float) else html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="tsft-summary"><tr>{head}</tr>{"".join(body)}</table>'
