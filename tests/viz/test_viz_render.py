"""HTML of the token views: one span per token with the predicted colour, data attributes, tooltip and escaping."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest

from tokensft.viz.colors import NAN_RGB, diverging_rgb
from tokensft.viz.render import legend_html, tokens_html, tooltip


class _Spans(HTMLParser):
    """Collect the attributes and text of every `span.tok`."""

    def __init__(self):
        super().__init__()
        self.spans, self._cur, self._depth = [], None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "tok" in a.get("class", "").split():
            self._cur = {**a, "text": ""}
            self.spans.append(self._cur)

    def handle_endtag(self, tag):
        if tag == "span":
            self._cur = None

    def handle_data(self, data):
        if self._cur is not None:
            self._cur["text"] += data


def _parse(html: str) -> list[dict]:
    p = _Spans()
    p.feed(html)
    return p.spans


def _bg(span: dict) -> str:
    style = dict(kv.split(":", 1) for kv in span["style"].strip("; ").split(";"))
    return style["background-color"].strip()


def test_spans_colours_and_attributes():
    tokens = ["<s>", "Ask", " 1", " <b>", "\n", " x"]
    values = np.array([np.nan, np.nan, 0.5, -1.0, 0.0, 2.0])
    cats = ["special", "word", "number", "punctuation", "whitespace", "word"]
    comp = np.array([0, 0, 1, 1, 1, 1], bool)
    html = tokens_html(tokens, values, cats, comp, 1.0, tooltips=[f"tip {i} & <x>" for i in range(6)],
                       marks=np.array([0, 0, 1, 0, 0, 0], bool), metric="alignment")
    spans = _parse(html)
    assert len(spans) == 6
    assert [int(s["data-index"]) for s in spans] == list(range(6))
    assert [s["data-role"] for s in spans] == ["prompt", "prompt"] + ["completion"] * 4
    assert [s["data-category"] for s in spans] == cats
    assert [s["data-value"] for s in spans] == ["nan", "nan", "0.5", "-1", "0", "2"]
    assert [_bg(s) for s in spans] == [NAN_RGB, NAN_RGB, "rgb(244, 165, 130)", "rgb(5, 113, 176)",
                                       "rgb(247, 247, 247)", "rgb(202, 0, 32)"]
    assert "prompt" in spans[0]["class"] and "mark" in spans[2]["class"] and "mark" not in spans[3]["class"]
    assert spans[3]["text"] == " <b>"  # escaped: shown as text, never parsed as a tag
    assert "<b>" not in html.replace("&lt;b&gt;", "")
    assert spans[4]["text"] == "↵\n"
    assert spans[1]["title"] == "tip 1 & <x>"
    # a role label before each run of prompt / completion tokens
    assert html.count('class="role prompt"') == 1 and html.count('class="role completion"') == 1


def test_template_tail_after_the_last_completion_token_gets_no_prompt_label():
    # prompt, completion ending in <|im_end|>, then the unsupervised "\n" the chat template adds: grey, no badge
    comp = np.array([0, 1, 1, 0], bool)
    html = tokens_html(["Q", "4", "<|im_end|>", "\n"], np.array([np.nan, 0.1, 0.2, np.nan]), ["word"] * 4, comp, 1.0)
    assert html.count('class="role prompt"') == 1 and html.count('class="role completion"') == 1
    assert html.index('class="role prompt"') < html.index('data-index="0"')
    assert _parse(html)[3]["data-role"] == "prompt"
    # a prompt run between two completion runs (multi-turn) keeps its label
    mid = tokens_html(list("abcde"), np.zeros(5), ["word"] * 5, np.array([0, 1, 0, 1, 0], bool), 1.0)
    assert mid.count('class="role prompt"') == 2


def test_skip_prompt_keeps_indices():
    comp = np.array([0, 1, 0, 1], bool)
    spans = _parse(tokens_html(list("abcd"), np.arange(4.0), ["word"] * 4, comp, 3.0, skip_prompt=True))
    assert [(s["data-index"], s["text"]) for s in spans] == [("1", "b"), ("3", "d")]


def test_vmax_sets_the_scale():
    spans = _parse(tokens_html(["a", "b"], np.array([1.0, -2.0]), ["word"] * 2, np.ones(2, bool), 4.0))
    assert [_bg(s) for s in spans] == [diverging_rgb(1.0, 4.0), diverging_rgb(-2.0, 4.0)]
    assert _bg(spans[1]) == "rgb(146, 197, 222)"


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 tokens but 2 values"):
        tokens_html(["a", "b", "c"], np.zeros(2), ["w"] * 3, np.ones(3, bool), 1.0)
    with pytest.raises(ValueError, match="vmax"):
        tokens_html(["a"], np.zeros(1), ["w"], np.ones(1, bool), 0.0)


def test_tooltip_lists_all_values():
    rec = {"t": 4, "token": " 4", "category": "number", "role": "completion", "loss": 0.6931, "p": 0.5,
           "entropy": float("nan"), "pos.alignment": -0.25, "pos.norm": 2.0, "tokloss.alignment": 0.125,
           "weight.topk": 0.0, "weight.lr": 1.25}
    t = tooltip(rec)
    assert t.splitlines()[0] == "#4 ' 4' · number · completion"
    assert "loss=0.6931  p=0.5  entropy=–" in t
    assert "pos: alignment=-0.25  norm=2" in t and "tokloss: alignment=0.125" in t
    assert "weights: sft-topk=0  sft-lr=1.25" in t


def test_legend_shows_the_range():
    h = legend_html(0.25, "alignment")
    assert 'data-vmax="0.25"' in h and ">-0.25<" in h and ">0.25<" in h and NAN_RGB in h
