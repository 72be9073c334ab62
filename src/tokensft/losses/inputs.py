"""What a scheme reads: its knobs (`SchemeParam`), the bundle of per-token inputs (`TokenInputs`), and the needs
that fill the bundle (`NEEDS`).

A scheme's weights are a function of one micro-batch's per-token inputs. `TokenInputs` carries all of them, `(B, T)`
each, every field in one frame (the trainer's and `weighted_lm_loss`'s: the shifted targets; the tracer's: the
token frame, position 0 masked). What a scheme reads beyond the log-probs is its `needs`. Each need is
declared once, here (`Need`): the bundle field it fills, what that is, the producer-side knobs that every scheme
needing it gets (`entropy_top_k`, `kl_weight`, ...), and how those knobs become the producer's arguments.

Every path that builds a bundle keeps one producer per need, looked up by the need's name: the trainer's
`compute_loss` (`TokenSFTTrainer._token_inputs`), the functional `weighted_lm_loss` and the tracer's scheme overlay
(`TokenGradTraceCallback.scheme_weights`). A need declared `head=True` is produced by the LM-head pass itself:
`chunked_softmax_stats` takes the merged `options` of the head needs (`head_options`) as keyword arguments and returns
the need's field; every other need's producer is called by `produce_needs`. So a new kind of token input is one
`TokenInputs` field, one `Need` below and one producer per path; no path branches on need names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import Tensor

from ..options import Option

# ----------------------------------------------------------------------------------------------------------------
# a scheme's knob
# ----------------------------------------------------------------------------------------------------------------
SchemeParam = Option  # one knob of a scheme: an `Option` (tokensft.options), declared with the scheme


# ----------------------------------------------------------------------------------------------------------------
# the bundle of per-token inputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenInputs:
    """Everything per token that the loss pipeline reads for one micro-batch: `(B, T)` tensors, all in one frame (in
    the trainer and `weighted_lm_loss` that of the shifted targets, `[:, s]` is target `labels[:, s + 1]`), any value
    where `mask` is False (even inf or NaN).

    Attributes:
        log_probs: log p_theta(y_t) in nats, float32, differentiable (the loss is -log_probs).
        mask: bool, True at supervised targets.
        ref_log_probs: log p_ref(y_t) in nats, no gradient (need `ref_log_probs`), else None.
        entropy: H(p_theta(. | y_<t)) in nats, no gradient (need `entropy`; logged when present), else None.
        topk_entropy: entropy over the `entropy_top_k` largest logits in nats (need `topk_entropy`), else None.
        alignment: d_t = <grad l_t, G>, G the micro-batch's aggregate gradient (need `token_alignment`; the estimated
            cosine a_t under `sft-align`'s clip-cosine), else None.
        kl: KL_t in nats, differentiable (need `ref_distribution`; the reduction adds beta * KL_t), else None.
        data_weights: non-negative weights from the data (`prompt_loss_weight`, per-message or per-token weights),
            multiplied into the scheme's weights; None = all 1.
        segment_ids: ints separating packed samples (`stat_scope="sequence"`), None = one sample per row.

    Build one with the fields a path has (`TokenInputs(log_probs, mask, ref_log_probs=ref)`) and add to it with
    `replace`.
    """

    log_probs: Tensor
    mask: Tensor
    ref_log_probs: Tensor | None = None
    entropy: Tensor | None = None
    topk_entropy: Tensor | None = None
    alignment: Tensor | None = None
    kl: Tensor | None = None
    data_weights: Tensor | None = None
    segment_ids: Tensor | None = None

    def replace(self, **fields: Tensor | None) -> TokenInputs:
        """A copy with `fields` replaced (`dataclasses.replace`). Raises TypeError on an unknown field."""
        return dataclasses.replace(self, **fields)

    def check(self, scheme: str, needs: Iterable[str], *, for_weights: bool = False) -> None:
        """Check shapes and that every need of `scheme` has its field.

        Args:
            scheme: the scheme's name, for the message.
            needs: its declared needs (names in `NEEDS`).
            for_weights: only the needs the weights read (not `loss_term` ones, the KL).

        Raises:
            ValueError: one line: a field whose shape differs from `mask`'s, or a needed field that is None
                (`mode 'sft-lr' needs ref_log_probs (TokenInputs.ref_log_probs): the reference's ...`).
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "mask" and value is not None and tuple(value.shape) != tuple(self.mask.shape):
                raise ValueError(f"{f.name} {tuple(value.shape)} and mask {tuple(self.mask.shape)} differ in shape")
        for name in self.missing(needs, for_weights=for_weights)[:1]:
            need = NEEDS[name]
            raise ValueError(f"mode {scheme!r} needs {name} (TokenInputs.{need.field}): {need.what}")

    def missing(self, needs: Iterable[str], *, for_weights: bool = False) -> list[str]:
        """The needs among `needs` whose field is None (with `for_weights`, not counting `loss_term` ones)."""
        return [n for n in needs if getattr(self, NEEDS[n].field) is None and not (for_weights and NEEDS[n].loss_term)]


FIELDS = tuple(f.name for f in dataclasses.fields(TokenInputs))
"""The bundle's field names, in order."""


# ----------------------------------------------------------------------------------------------------------------
# the needs: what fills each field, declared once
# ----------------------------------------------------------------------------------------------------------------
def _no_options(params: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Need:
    """One kind of per-token input a scheme may declare it needs (`register_scheme(needs=...)`).

    Attributes:
        name: what schemes write in `needs=` (`ref_log_probs`, `topk_entropy`, ...).
        field: the `TokenInputs` field it fills.
        what: one line, for errors and docs.
        params: producer-side knobs: every scheme that declares the need gets them as parameters (flags, ranges,
            help), declared once here.
        options: the producer's keyword arguments, from a scheme's resolved parameters (e.g.
            `{"topk_entropy_k": params["entropy_top_k"]}`).
        head: produced by the LM-head pass: `chunked_softmax_stats(**options)` returns `field`. A head need with
            options (the KL, the top-K entropy) is served by the chunked head only, the one that computes it; one
            without (the entropy) by every head.
        loss_term: the field enters the reduction (the KL term), not the weights: `token_weights` does not ask for it,
            and a scheme's context does not show it.
        packed: its producers take packed rows (`--padding_free`); False for one that runs each row on its own.
    """

    name: str
    field: str
    what: str
    params: tuple[SchemeParam, ...] = ()
    options: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_options
    head: bool = False
    loss_term: bool = False
    packed: bool = True


# The KL's knobs: declared once, given to every scheme that needs the reference's full distribution
KL_WEIGHT = SchemeParam("kl_weight", float, 0.05, "beta of the KL(p_ref || p_theta) term.", low=0.0)
KL_DIRECTION = SchemeParam("kl_direction", str, "forward",
                           "KL(p_ref || p_theta) ('forward', the reference study's) or KL(p_theta || p_ref).",
                           choices=("forward", "reverse"))
# The K of the top-K entropy: declared once, given to every scheme that needs it
ENTROPY_TOP_K = SchemeParam("entropy_top_k", int, 20, "K of the top-K entropy H^(K) (the K largest logits).", low=1)
# The alignment's knob: the k of the |grad l_t| estimate when a scheme asks for the cosine (`sft-align`'s clip-cosine)
ALIGN_NORM_DIRECTIONS = SchemeParam("align_norm_directions", int, 8, "k random directions of the |grad l_t| estimate "
                                    "of align_rule=clip-cosine (k more JVP tangents per row).", low=1)


def _alignment_options(params: Mapping[str, Any]) -> dict[str, Any]:
    # d_t itself (norm_directions=0), or the estimated cosine a_t for a scheme that asks for it (align_rule)
    cosine = params.get("align_rule") == "clip-cosine"
    return {"norm_directions": int(params["align_norm_directions"]) if cosine else 0}


_NEEDS: dict[str, Need] = {}


def _declare(need: Need) -> None:
    if need.field not in FIELDS or need.field in ("log_probs", "mask"):
        raise ValueError(f"need {need.name!r}: {need.field!r} is not an optional TokenInputs field")
    _NEEDS[need.name] = need


_declare(Need("ref_log_probs", "ref_log_probs", "the reference's per-token log-probs (a reference model: ref_source "
              "adapter | model | cache)"))
_declare(Need("ref_distribution", "kl", "the per-token KL to the reference's full distribution (the loss adds "
              "kl_weight * KL(p_ref || p_theta))", params=(KL_WEIGHT, KL_DIRECTION),
              options=lambda p: {"kl_direction": p["kl_direction"]}, head=True, loss_term=True))
_declare(Need("entropy", "entropy", "the policy's per-token entropy", head=True))
_declare(Need("topk_entropy", "topk_entropy", "the policy's per-token entropy over its entropy_top_k largest logits",
              params=(ENTROPY_TOP_K,), options=lambda p: {"topk_entropy_k": int(p["entropy_top_k"])}, head=True))
_declare(Need("token_alignment", "alignment", "each token's gradient alignment d_t = <grad l_t, G> with the "
              "micro-batch's aggregate gradient (one extra backward and one forward-mode JVP per micro-batch, "
              "tokensft.tracing.core.micro_batch_alignment)", params=(ALIGN_NORM_DIRECTIONS,),
              options=_alignment_options, packed=False))

NEEDS: Mapping[str, Need] = MappingProxyType(_NEEDS)
"""Every need by name (read-only): what a scheme may declare in `needs=`, and what fills it."""


def head_options(needs: Iterable[str], params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments the LM-head pass (`chunked_softmax_stats`) takes for `needs`: the merged `options` of
    the head needs. Empty when the needs ask the head for nothing beyond log-probs and entropy (then any head path
    serves them); otherwise only the chunked head computes them."""
    out: dict[str, Any] = {}
    for name in needs:
        if NEEDS[name].head:
            out.update(NEEDS[name].options(params))
    return out


def produce_needs(needs: Iterable[str], params: Mapping[str, Any],
                  producers: Mapping[str, Callable[..., Tensor | None]], *, head: bool = False,
                  partial: bool = False) -> dict[str, Tensor | None]:
    """The `TokenInputs` fields of `needs`, each from its producer, in `NEEDS` order: `bundle.replace(**fields)`.

    Args:
        needs: need names (a scheme's `needs`, plus any the path adds, e.g. the premise metrics' alignment).
        params: the scheme's resolved parameters (the needs' `options` read them).
        producers: need name -> callable taking the need's `options` as keyword arguments and returning the
            `(B, T)` field (or None when the path cannot make it; `TokenInputs.check` then names the need).
        head: also the head needs, for a path whose head pass does not compute them (the tracer); by default
            they are the head pass's (`head_options`) and skipped here.
        partial: only the needs that have a producer here (a path that produces in phases, e.g. the trainer: what
            does not read the head pass before it, the rest after).

    Raises:
        ValueError: a need to produce without a producer on this path (unless `partial`).
    """
    fields: dict[str, Tensor | None] = {}
    wanted = set(needs)
    for name, need in NEEDS.items():
        if name not in wanted or (need.head and not head) or (partial and name not in producers):
            continue
        if name not in producers:
            raise ValueError(f"this path has no producer of the need {name!r} ({need.what})")
        fields[need.field] = producers[name](**need.options(params))
    return fields
