"""Token-weighting schemes: each one function of per-token log-probs plus one declaration of its knobs and needs.

A scheme is a function `SchemeContext -> (B, T)` weights (detached; zeroed outside the mask for you) registered with
`register_scheme(name, fn, params=..., needs=..., scope=...)`. That one declaration is all tokensft reads: the CLI
and YAML flags of its parameters, their validation (before any model loads), `tokensft train --help`, whether the
trainer runs a reference model or the `stat_scope=global` pass, and which weights the tracer overlays. Normalisation is
not a scheme's business: it lives in `tokensft.losses.core.reduce_token_loss`. What a scheme reads is one
`TokenInputs` bundle (`tokensft.losses.inputs`): the log-probs and mask always, and the field of each need it declares
(`NEEDS`: `ref_log_probs`, `ref_distribution`, `entropy`, `topk_entropy`, `token_alignment`), which every path fills
with its own producer of that need.

Notation (the loss-schemes issue): l_t = -log p_theta(y_t), p_t = exp(-l_t); all weights are detached.

| mode | weight w_t | source |
| --- | --- | --- |
| `sft`, `sft+kl` | 1 | plain cross-entropy |
| `dft`, `asft` | p_t | DFT, Wu et al. 2025 "On the Generalization of SFT" (arXiv:2508.05629), eq. 9; ASFT (arXiv:2509.23753) adds KL(p_ref || p_theta) |
| `sft-topk` | 1 if l_t <= k-th smallest l in scope else 0, k = max(1, floor(n * keep_ratio)) (ties kept) | the reference study |
| `sft-antiop` | 1 if l_t <= c*m else c*m / (l_t + 1e-8), m = lower median of l in scope | the reference study |
| `sft-lr` | max(0.1, 1 + alpha * clamp(p_ref - p_t, -1, 1)) | the reference study |
| `sft-pk` | p_t^k * [p_t >= tau] | "Beyond Log Likelihood", Li et al. 2025 (arXiv:2510.00526), the -p^k family |
| `rho1` | 1 if Delta_t >= k-th largest Delta in scope else 0, Delta = l_theta - l_ref, k = max(1, floor(n * ratio)) | Rho-1, Lin et al. 2024 (arXiv:2404.07965), sec. 2.2 |
| `eaft` | (H^(K)_t / norm)^alpha, H^(K) = entropy over the K largest logits | EAFT (arXiv:2601.02151); LLaMA-Factory's `use_eaft_loss` |
| `sft-align` | drop: [d_t >= 0]; clip: 1 if d_t >= 0 else max(0, 1 + d_t / q-quantile of abs(d) over the opposing tokens in scope); clip-cosine: clip on a_t = d_t / (norm(grad l_t) norm(G)) | ours: the reference study's premise, measured |

Scope of a scheme's statistic (median, k-th smallest), `stat_scope`, for schemes declared with `scope=`:
- `micro_batch`: all valid tokens of the tensor passed in (the reference study's behaviour);
- `sequence`: each sequence separately (`segment_ids` separates packed samples inside one row);
- `global`: all valid tokens of the optimizer step, across gradient-accumulation micro-batches and data-parallel
  ranks, passed in as `scope_values` (1-D). The trainer gathers them with one extra no-grad forward per
  micro-batch, for every scheme that declares `scope=`. Without `scope_values`, `global` falls back to the tokens
  passed in.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .inputs import FIELDS, NEEDS, SchemeParam, TokenInputs

STAT_SCOPES = ("micro_batch", "sequence", "global")
AFFECTS = ("zero", "below_one")
"""The affected-token rules a scheme may declare (`register_scheme(affects=...)`): `zero`, a token is affected when its
weight is exactly 0 (the scheme drops it); `below_one`, when its weight is below 1 - `AFFECTED_TOL` (clipped or
down-weighted). `None`: no meaningful rule (the weight is constant, or p_t < 1 almost everywhere)."""
AFFECTED_TOL = 1e-6
"""Margin of `below_one`: it absorbs float32 noise around a weight of 1 (float16 stores 1.0 exactly; its next value
below 1, 0.99951, is a real clip and counts as affected)."""
# ----------------------------------------------------------------------------------------------------------------
# declarations
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """A registered weighting scheme (see `register_scheme`)."""

    name: str
    fn: Callable[[SchemeContext], Tensor]
    params: tuple[SchemeParam, ...] = ()
    needs: frozenset[str] = frozenset()
    scope: Callable[[SchemeContext], Tensor] | None = None
    description: str = ""
    source: str = ""
    traced: bool = True
    trace_key: str = ""
    affects: str | None = "below_one"
    affects_label: str = ""

    def rule(self) -> dict[str, Any]:
        """The affected-token rule as the tracer writes it into the trace metadata: `{"name", "affects", "label"}`."""
        return {"name": self.name, "affects": self.affects, "label": self.affects_label}

    @property
    def needs_reference(self) -> bool:
        """Reads the reference's per-token log-probs (`ctx.ref_log_probs`)."""
        return "ref_log_probs" in self.needs

    @property
    def uses_kl(self) -> bool:
        """Adds beta * KL(p_ref || p_theta) per token (needs the reference's full distribution)."""
        return "ref_distribution" in self.needs

    @property
    def uses_scope_statistic(self) -> bool:
        """Takes a statistic over `stat_scope` (so `stat_scope=global` needs the trainer's extra pass)."""
        return self.scope is not None

    def resolve_params(self, values: Mapping[str, Any] | None = None, *, strict: bool = True) -> dict[str, Any]:
        """This scheme's parameters: the declared defaults overridden by `values`, each validated.

        Args:
            values: parameter name -> value; names of other schemes' parameters are ignored unless `strict` and
                they are declared by no scheme at all.
            strict: raise on a name that no registered scheme declares.

        Raises:
            ValueError: an out-of-range value (naming the flag) or, with `strict`, an unknown parameter name.
        """
        values = dict(values or {})
        if strict:
            known = all_params()
            unknown = sorted(k for k in values if k not in known)
            if unknown:
                raise ValueError(f"unknown scheme parameter(s) {', '.join(unknown)}; mode {self.name!r} takes "
                                 f"{', '.join(p.name for p in self.params) or 'none'}")
        return {p.name: p.validate(values[p.name]) if p.name in values else p.default for p in self.params}


_REGISTRY: dict[str, Scheme] = {}


def token_losses(ctx: SchemeContext) -> Tensor:
    """Scope values of loss-statistic schemes (topk, antiop): l_t `(B, T)`."""
    return ctx.losses


def register_scheme(
    name: str,
    fn: Callable[[SchemeContext], Tensor],
    *,
    params: Iterable[SchemeParam] = (),
    needs: Iterable[str] = (),
    scope: Callable[[SchemeContext], Tensor] | None = None,
    description: str = "",
    source: str = "",
    traced: bool = True,
    trace_key: str | None = None,
    affects: str | None = "below_one",
    affects_label: str | None = None,
    overwrite: bool = False,
) -> Scheme:
    """Register a weighting scheme under `name` (then usable as `--mode name`, with its parameters as flags).

    Args:
        fn: maps a `SchemeContext` to weights `(B, T)`; the result is detached and zeroed outside the mask for you.
            Parameters are read as `ctx.<param name>` (or `ctx.params[...]`).
        params: the scheme's knobs (`SchemeParam`); each need adds its own producer-side knobs (`Need.params`: a
            scheme that needs `ref_distribution` also gets `kl_weight` and `kl_direction`, one that needs
            `topk_entropy` gets `entropy_top_k`, one that needs `token_alignment` gets `align_norm_directions`).
        needs: names in `NEEDS` (`tokensft.losses.inputs`): `ref_log_probs` (the trainer then runs the reference),
            `ref_distribution` (the loss adds beta * KL), `entropy`, `topk_entropy`, `token_alignment`; the scheme
            reads each as its `TokenInputs` field (`ctx.ref_log_probs`, `ctx.topk_entropy`, `ctx.alignment`, ...).
        scope: for a scheme that takes a statistic over `stat_scope` (via `ctx.scope_statistic(stat)`): maps the
            context to the per-token values `(B, T)` the statistic is taken over (`token_losses` for a loss
            statistic). The trainer then runs the `stat_scope=global` pass for it.
        description: one line for `--help` and the visualizer.
        source: paper and section, or "the reference study".
        traced: the tracer records the weights it would give each traced token (False for schemes whose weight is
            constant or equals another scheme's).
        trace_key: suffix of its `weight.<key>` trace array (default: `name`).
        affects: which tokens the scheme affects (`AFFECTS`): `"zero"` (weight exactly 0: a dropping scheme),
            `"below_one"` (weight < 1 - `AFFECTED_TOL`: clipping or down-weighting), or None (no meaningful rule).
            The tracer writes it into the trace metadata; premise metrics, analysis and visualizer read it there.
        affects_label: what the scheme does to an affected token, as tables and figures show it (default
            `"<name> down-weights"`).

    Returns:
        The registered `Scheme`.

    Raises:
        ValueError: `name` is a built-in scheme (never replaced, even with `overwrite`), or already registered and
            `overwrite` is False; an unknown need or `affects` rule; a parameter name that another scheme declares
            differently, or that the context uses (a `TokenInputs` field such as `entropy`, or `losses`).
    """
    if name in globals().get("BUILTIN_MODES", ()):
        raise ValueError(f"loss scheme {name!r} is built in and cannot be replaced; register yours under another name")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"loss scheme {name!r} is already registered")
    needs = frozenset(needs)
    bad = sorted(needs - set(NEEDS))
    if bad:
        raise ValueError(f"scheme {name!r}: unknown need(s) {bad}; known: {list(NEEDS)}")
    if affects is not None and affects not in AFFECTS:
        raise ValueError(f"scheme {name!r}: affects must be one of {', '.join(AFFECTS)} or None, got {affects!r}")
    params = tuple(params)
    for need in NEEDS.values():  # the producer-side knobs of each need, declared once on the need
        if need.name in needs:
            params += tuple(p for p in need.params if p not in params)
    others = {p.name: p for s in _REGISTRY.values() if s.name != name for p in s.params}
    for p in params:
        if p.name in FIELDS or p.name in ("losses", "params", "inputs", "scheme", "stat_scope", "scope_values"):
            raise ValueError(f"scheme {name!r}: parameter name {p.name!r} is taken by the scheme context "
                             f"(ctx.{p.name}); choose another")
        if p.name in others and others[p.name] != p:
            raise ValueError(f"scheme {name!r}: parameter {p.name!r} is already declared differently by another "
                             "scheme; reuse that SchemeParam or choose another name")
    scheme = Scheme(name, fn, params, needs, scope, description, source, traced, trace_key or name, affects,
                    affects_label or f"{name} down-weights")
    _REGISTRY[name] = scheme
    return scheme


def affected(weights, rule: str) -> Any:
    """Bool mask of the tokens a scheme with affected-token rule `rule` affects: the one place the comparison lives.

    Args:
        weights: the scheme's weights, a numpy array or a tensor (any shape; a list is read as a float array).
        rule: `"zero"` (weight == 0) or `"below_one"` (weight < 1 - `AFFECTED_TOL`).

    Returns:
        a bool array / tensor of the shape of `weights`; False where the weight is NaN.

    Raises:
        ValueError: `rule` is not one of `AFFECTS` (None included: such a scheme has no affected tokens to count).
    """
    if not hasattr(weights, "dtype"):
        weights = np.asarray(weights, dtype=np.float64)
    if rule == "zero":
        return weights == 0
    if rule == "below_one":
        return weights < 1 - AFFECTED_TOL
    raise ValueError(f"affected-token rule must be one of {', '.join(AFFECTS)}, got {rule!r}")


def traced_rules() -> dict[str, dict[str, Any]]:
    """`trace_key -> Scheme.rule()` of every registered scheme declared `traced` (the fallback of trace metadata
    written before the tracer recorded the rules)."""
    return {s.trace_key: s.rule() for s in _REGISTRY.values() if s.traced}


def get_scheme(name: str | Scheme) -> Scheme:
    """The registered scheme `name` (a `Scheme` is returned as is). Raises ValueError listing the known modes."""
    if isinstance(name, Scheme):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss mode {name!r}; known modes: {', '.join(available_modes())}") from None


def available_modes() -> list[str]:
    """Names of all registered schemes."""
    return list(_REGISTRY)


def all_params() -> dict[str, SchemeParam]:
    """Every declared scheme parameter by name (each declared once), in registration order."""
    out: dict[str, SchemeParam] = {}
    for s in _REGISTRY.values():
        for p in s.params:
            out.setdefault(p.name, p)
    return out


def param_users(name: str) -> list[str]:
    """Names of the schemes that declare parameter `name`."""
    return [s.name for s in _REGISTRY.values() if any(p.name == name for p in s.params)]


def load_scheme_file(path: str | Path) -> list[str]:
    """Import a user's Python file that calls `register_scheme`; returns the modes it registered.

    The file is imported once per resolved path (a second call registers nothing new and returns `[]`).

    Raises:
        ValueError: the file does not exist or is not a `.py` file, has a syntax error, or raises when imported (one
            line naming the file and line).
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file() or p.suffix != ".py":
        raise ValueError(f"--scheme_files: {path}: not a Python file")
    mod_name = f"tokensft_user_scheme_{abs(hash(str(p)))}"
    if mod_name in sys.modules:
        return []
    before = set(_REGISTRY)
    spec = importlib.util.spec_from_file_location(mod_name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[mod_name]
        raise ValueError(f"--scheme_files: {path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # the file's own code failed: where in it, in one line (TOKENSFT_DEBUG=1 for the traceback)
        del sys.modules[mod_name]
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == p]
        line = f":{frames[-1].lineno}" if frames else ""
        raise ValueError(f"--scheme_files: {path}{line}: importing it raised {type(e).__name__}: {e}") from e
    return [n for n in _REGISTRY if n not in before]


# ----------------------------------------------------------------------------------------------------------------
# the context a scheme sees
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemeContext:
    """What a weighting scheme sees: one micro-batch's `TokenInputs` (detached float32, 0 outside `mask`), its
    resolved parameters and the scope of its statistics.

    Every `TokenInputs` field and every parameter reads as an attribute: `ctx.log_probs`, `ctx.mask`,
    `ctx.ref_log_probs`, `ctx.entropy`, `ctx.topk_entropy`, `ctx.alignment`, `ctx.segment_ids`, ...,
    `ctx.topk_keep_ratio`. A field the scheme does not declare a need for may be None; the KL and the data weights
    are always None here (the weights never read them: the KL is a term of the loss, the data weights multiply the
    scheme's weights afterwards).

    Attributes:
        inputs: the bundle (`(B, T)` each; see `TokenInputs`), sanitised: detached, float32, 0 outside `mask`.
        params: the scheme's resolved parameters.
        stat_scope: `micro_batch` | `sequence` | `global`.
        scope_values: 1-D scope values of every valid token of the optimizer step (`global` scope), or None.
        scheme: the scheme being evaluated (its `scope` gives the values of a scope statistic).
    """

    inputs: TokenInputs
    params: Mapping[str, Any] = field(default_factory=dict)
    stat_scope: str = "micro_batch"
    scope_values: Tensor | None = None
    scheme: Scheme | None = None

    @property
    def losses(self) -> Tensor:
        """l_t = -log p_theta(y_t) `(B, T)`."""
        return -self.inputs.log_probs

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("params", "inputs"):
            raise AttributeError(name)
        if name in FIELDS:
            return getattr(self.inputs, name)
        try:
            return self.params[name]
        except KeyError:
            raise AttributeError(f"SchemeContext has no attribute, token input or scheme parameter {name!r}") from None

    def scope_statistic(self, stat: Callable[[Tensor], Tensor]) -> Tensor:
        """`stat` of the scheme's scope values over each token's scope, broadcast to `(B, T)` (see `scope_statistic`)."""
        return scope_statistic(self, stat)


def topk_keep_count(n: int, keep_ratio: float) -> int:
    """k = max(1, floor(n * keep_ratio)), robust to float error (0.7 * 10 -> 7)."""
    return max(1, math.floor(n * keep_ratio + 1e-9))


def _lower_median(x: Tensor) -> Tensor:
    return torch.median(x)  # torch.median returns the lower of the two middle values


def _kth_smallest(keep_ratio: float) -> Callable[[Tensor], Tensor]:
    def stat(x: Tensor) -> Tensor:
        return torch.kthvalue(x, topk_keep_count(x.numel(), keep_ratio)).values

    return stat


def scope_statistic(ctx: SchemeContext, stat: Callable[[Tensor], Tensor]) -> Tensor:
    """Broadcast a statistic of the valid scope values in each token's scope to `(B, T)`.

    The scope values are `ctx.scheme.scope(ctx)` (the token losses when the scheme declares none); under
    `stat_scope="global"` with `ctx.scope_values` they are the whole optimizer step's.

    Args:
        ctx: scheme inputs; `ctx.stat_scope` selects the scope (see module docstring).
        stat: reduces a 1-D tensor (>= 1 element) to a scalar.

    Returns:
        `(B, T)` float32; arbitrary (0) where no valid token is in scope.

    Raises:
        ValueError: unknown `stat_scope`.
    """
    values_of = ctx.scheme.scope if (ctx.scheme is not None and ctx.scheme.scope is not None) else token_losses
    values = values_of(ctx).detach().float()
    mask = ctx.mask
    out = torch.zeros_like(values)
    if ctx.stat_scope == "global" and ctx.scope_values is not None and ctx.scope_values.numel() > 0:
        return out + stat(ctx.scope_values.detach().float().to(values.device))
    if ctx.stat_scope in ("micro_batch", "global"):
        valid = values[mask]
        return out + stat(valid) if valid.numel() else out
    if ctx.stat_scope == "sequence":
        seg = ctx.segment_ids
        if seg is None:
            seg = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
        for s in torch.unique(seg[mask]):
            sel = mask & (seg == s)
            out[sel] = stat(values[sel])
        return out
    raise ValueError(f"stat_scope must be one of {STAT_SCOPES}, got {ctx.stat_scope!r}")


# ----------------------------------------------------------------------------------------------------------------
# the built-in schemes: one function + one declaration each
# ----------------------------------------------------------------------------------------------------------------
def _ones(ctx: SchemeContext) -> Tensor:
    return torch.ones_like(ctx.log_probs)


def _prob(ctx: SchemeContext) -> Tensor:
    return ctx.log_probs.exp()


def _topk(ctx: SchemeContext) -> Tensor:
    thr = ctx.scope_statistic(_kth_smallest(ctx.topk_keep_ratio))
    return (ctx.losses <= thr).float()


def _antiop(ctx: SchemeContext) -> Tensor:
    losses = ctx.losses
    cap = ctx.antiop_clip_mult * ctx.scope_statistic(_lower_median)
    return torch.where(losses <= cap, torch.ones_like(losses), cap / (losses + 1e-8))


def _lr(ctx: SchemeContext) -> Tensor:
    diff = (ctx.ref_log_probs.exp() - ctx.log_probs.exp()).clamp(-1.0, 1.0)
    return (1.0 + ctx.lr_weight_alpha * diff).clamp(min=0.1)


TOPK_KEEP_RATIO = SchemeParam("topk_keep_ratio", float, 0.7, "share of lowest-loss tokens kept.", low=0.0,
                              high=1.0, low_open=True)
ANTIOP_CLIP_MULT = SchemeParam("antiop_clip_mult", float, 3.0, "tokens with loss > c x median loss are clipped to it.",
                               low=0.0, low_open=True)
LR_WEIGHT_ALPHA = SchemeParam("lr_weight_alpha", float, 1.0, "w = max(0.1, 1 + alpha (p_ref - p_theta)).", low=0.0)
PK_POWER = SchemeParam("pk_power", float, 10.0, "k of w = p^k (the objective -p^k; k = 1 is dft).", low=0.0)
PK_MIN_PROB = SchemeParam("pk_min_prob", float, 0.0, "tau: tokens with p < tau get weight 0 (the paper's thresholded "
                          "variant; 0 = off).", low=0.0, high=1.0, high_open=True)
RHO1_KEEP_RATIO = SchemeParam("rho1_keep_ratio", float, 0.6, "share of tokens of largest excess loss kept.", low=0.0,
                              high=1.0, low_open=True)
ALIGN_RULE = SchemeParam("align_rule", str, "drop", "drop: w = 0 on opposing tokens (d_t < 0); clip: w falls "
                         "linearly to 0 at the q-quantile of the opposition; clip-cosine: clip on the cosine "
                         "a_t = d_t / (|grad l_t| |G|), |grad l_t| estimated (approximate).",
                         choices=("drop", "clip", "clip-cosine"))
ALIGN_CLIP_QUANTILE = SchemeParam("align_clip_quantile", float, 0.5, "q of align_rule=clip: opposing tokens with "
                                  "abs(d_t) at or above this quantile of the opposition get weight 0.", low=0.0,
                                  high=1.0, low_open=True)
EAFT_ALPHA = SchemeParam("eaft_alpha", float, 1.0, "alpha of w = (H^(K) / norm)^alpha.", low=0.0)
EAFT_ENTROPY_NORM = SchemeParam("eaft_entropy_norm", float, 3.0, "norm of w = (H^(K) / norm)^alpha (3.0 as in "
                                "LLaMA-Factory: about ln 20, the largest top-20 entropy).", low=0.0, low_open=True)
EAFT_NORM = SchemeParam("eaft_norm", str, "constant", "normaliser of w = (H^(K) / norm)^alpha: constant "
                        "(eaft_entropy_norm, LLaMA-Factory's 3.0) or ln_k (ln entropy_top_k, the largest top-K entropy: w <= 1 for any K, "
                        "as in axolotl's later port).", choices=("constant", "ln_k"))

def _pk(ctx: SchemeContext) -> Tensor:
    p = ctx.log_probs.exp()
    return p.pow(ctx.pk_power) * (p >= ctx.pk_min_prob).float()


def _excess_loss(ctx: SchemeContext) -> Tensor:
    """Rho-1's score Delta_t = l_theta,t - l_ref,t `(B, T)` (nats): what the reference predicts better."""
    return ctx.losses + ctx.ref_log_probs


def _rho1(ctx: SchemeContext) -> Tensor:
    def kth_largest(x: Tensor) -> Tensor:
        return torch.kthvalue(x, x.numel() - topk_keep_count(x.numel(), ctx.rho1_keep_ratio) + 1).values

    return (_excess_loss(ctx) >= ctx.scope_statistic(kth_largest)).float()


def _eaft(ctx: SchemeContext) -> Tensor:
    norm = math.log(ctx.entropy_top_k) if ctx.eaft_norm == "ln_k" else ctx.eaft_entropy_norm
    if norm <= 0:  # ln 1 = 0: the top-1 entropy is 0 everywhere; w = 0^alpha, as the constant norm gives
        return torch.zeros_like(ctx.topk_entropy).pow(ctx.eaft_alpha)
    return (ctx.topk_entropy / norm).pow(ctx.eaft_alpha)


def _alignment(ctx: SchemeContext) -> Tensor:
    """Scope values of `sft-align`: the measured alignment d_t `(B, T)` (the cosine a_t with clip-cosine)."""
    return ctx.alignment


def _align(ctx: SchemeContext) -> Tensor:
    d = ctx.alignment
    if ctx.align_rule == "drop":
        return (d >= 0).float()
    q = ctx.align_clip_quantile

    def opposing_quantile(x: Tensor) -> Tensor:  # q-quantile of |d| over the opposing tokens in scope
        neg = -x[x < 0]
        return torch.quantile(neg.double(), q).float() if neg.numel() else x.new_tensor(float("inf"))

    scale = ctx.scope_statistic(opposing_quantile)
    return torch.where(d >= 0, torch.ones_like(d), (1 + d / scale).clamp(min=0.0))


register_scheme("sft", _ones, description="plain cross-entropy", source="plain CE", traced=False, affects=None)
register_scheme("dft", _prob, description="CE x detached p_t", source="DFT, arXiv:2508.05629, eq. 9",
                trace_key="dft", affects=None)
register_scheme("sft+kl", _ones, needs=("ref_distribution",), description="CE + beta * KL(p_ref || p_theta)",
                source="KL-regularised SFT", traced=False, affects=None)
register_scheme("asft", _prob, needs=("ref_distribution",), description="DFT + beta * KL(p_ref || p_theta)",
                source="ASFT, Zhu et al. 2025 (arXiv:2509.23753): DFT + full-vocabulary KL(p_ref || p_theta) anchor",
                traced=False, affects=None)
register_scheme("sft-topk", _topk, params=(TOPK_KEEP_RATIO,), scope=token_losses,
                description="keep the lowest-loss keep_ratio of tokens", source="the reference study",
                trace_key="topk", affects="zero", affects_label="sft-topk drops")
register_scheme("sft-antiop", _antiop, params=(ANTIOP_CLIP_MULT,), scope=token_losses,
                description="clip the loss of tokens above c x median loss", source="the reference study",
                trace_key="antiop", affects="below_one", affects_label="sft-antiop clips")
register_scheme("sft-lr", _lr, params=(LR_WEIGHT_ALPHA,), needs=("ref_log_probs",),
                description="w = max(0.1, 1 + alpha (p_ref - p_theta))", source="the reference study", trace_key="lr",
                affects="below_one", affects_label="sft-lr down-weights")
register_scheme("sft-pk", _pk, params=(PK_POWER, PK_MIN_PROB), description="CE x detached p_t^k [p_t >= tau]",
                source="Beyond Log Likelihood, arXiv:2510.00526", affects="below_one")
register_scheme("rho1", _rho1, params=(RHO1_KEEP_RATIO,), needs=("ref_log_probs",), scope=_excess_loss,
                description="keep the tokens of largest excess loss l_theta - l_ref", source="Rho-1, arXiv:2404.07965",
                affects="zero", affects_label="rho1 drops")
register_scheme("sft-align", _align, params=(ALIGN_RULE, ALIGN_CLIP_QUANTILE),
                needs=("token_alignment",),
                scope=_alignment, description="drop (or clip) the tokens whose gradient opposes the micro-batch's",
                source="ours: the reference study's premise, measured", trace_key="align", affects="zero",
                affects_label="sft-align drops")
register_scheme("eaft", _eaft, params=(EAFT_ALPHA, EAFT_ENTROPY_NORM, EAFT_NORM), needs=("topk_entropy",),
                description="CE x (top-K entropy / norm)^alpha", source="EAFT, arXiv:2601.02151", affects="below_one")


# The built-in schemes, frozen once registered: config fields and flags come from this snapshot only (never from what
# a --scheme_files file added to the process before the config module was imported), and none can be replaced.
BUILTIN_MODES: frozenset[str] = frozenset(_REGISTRY)


def builtin_params() -> dict[str, SchemeParam]:
    """Every parameter the built-in schemes declare, by name (each once, in registration order): the ones with a
    `TokenSFTConfig` field and a `--flag` of their own. A `--scheme_files` scheme's own parameters are not among
    them, whatever the import order; they go through `--scheme_args`."""
    return {name: p for name, p in all_params().items() if any(u in BUILTIN_MODES for u in param_users(name))}


def token_weights(
    mode: str | Scheme,
    inputs: TokenInputs,
    *,
    params: Mapping[str, Any] | None = None,
    stat_scope: str = "micro_batch",
    scope_values: Tensor | None = None,
    **param_values: Any,
) -> Tensor:
    """Detached per-token weights of a loss mode.

    Args:
        mode: a registered scheme name (`sft`, `dft`, `sft+kl`, `asft`, `sft-topk`, `sft-antiop`, `sft-lr`, ...).
        inputs: the micro-batch's `TokenInputs` (`(B, T)` each): `log_probs`, `mask` and the fields of the scheme's
            needs (`ref_log_probs` for `sft-lr`, `topk_entropy` for `eaft`, `alignment` for `sft-align`; not the KL,
            which the weights never read); `segment_ids` for `stat_scope="sequence"` (default: one per row).
        params / **param_values: the scheme's parameters by name (`topk_keep_ratio=0.7`, ...); missing ones take
            the declared defaults; parameters of other registered schemes are ignored.
        stat_scope: `micro_batch` | `sequence` | `global` (see module docstring).
        scope_values: 1-D scope values of every valid token of the optimizer step, for `stat_scope="global"`.

    Returns:
        `(B, T)` float32 weights, detached, exactly 0 where `mask` is False.

    Raises:
        ValueError: unknown mode, scope or parameter name; an out-of-range parameter; a needed input missing; shapes
            that disagree.
    """
    scheme = get_scheme(mode)
    ctx = _context(scheme, inputs, params={**(params or {}), **param_values}, stat_scope=stat_scope,
                   scope_values=scope_values)
    with torch.no_grad():
        w = scheme.fn(ctx).float()
        return torch.where(ctx.mask, w, torch.zeros((), device=w.device))


def scope_values_of(mode: str | Scheme, inputs: TokenInputs, *, params: Mapping[str, Any] | None = None) -> Tensor:
    """1-D scope values of the valid tokens (what the trainer's `stat_scope=global` pass gathers for `mode`): the
    scheme's declared `scope` values (the token losses l_t for topk/antiop), float32, detached.

    Args: as `token_weights`.
    Raises: as `token_weights`.
    """
    scheme = get_scheme(mode)
    ctx = _context(scheme, inputs, params=params or {})
    with torch.no_grad():
        return (scheme.scope or token_losses)(ctx).float()[ctx.mask]


def _context(scheme: Scheme, inputs: TokenInputs, *, params: Mapping[str, Any], stat_scope: str = "micro_batch",
             scope_values: Tensor | None = None) -> SchemeContext:
    if stat_scope not in STAT_SCOPES:
        raise ValueError(f"stat_scope must be one of {STAT_SCOPES}, got {stat_scope!r}")
    inputs.check(scheme.name, scheme.needs, for_weights=True)
    resolved = scheme.resolve_params(params)
    mask = inputs.mask.bool()
    zero = torch.zeros((), device=inputs.log_probs.device)

    def safe(x: Tensor | None) -> Tensor | None:
        # Masked positions may hold anything (even inf): neutralise them before any statistic is taken
        return None if x is None else torch.where(mask, x.detach().float(), zero)

    # what the weights never read is None, so that no path can weight by it: the loss terms (the KL, which the
    # stat_scope pass and the tracer do not have) and the data weights (multiplied in after the scheme)
    hidden = {need.field for need in NEEDS.values() if need.loss_term} | {"data_weights"}
    clean = {f: None if f in hidden else safe(getattr(inputs, f)) for f in FIELDS if f not in ("mask", "segment_ids")}
    return SchemeContext(inputs.replace(mask=mask, **clean), resolved, stat_scope=stat_scope,
                         scope_values=scope_values, scheme=scheme)
