"""Per-token gradient quantities of one sequence: plain functions, usable without a Trainer.

Notation (one sequence of T tokens; token t = input_ids[t], its loss l_t = -log p(y_t | y_<t) comes from the logits
at position t-1, so t = 0 is never a target; L = sum_t l_t over the supervised targets, *summed*, not averaged):

Per-position contributions (the reference study's quantity). For a traced Linear layer y = x W^T, with layer input
x_t and output gradient dy_t = dL/dy_t at position t, the weight gradient is dL/dW = sum_t g_t with g_t = dy_t x_t^T.
dy_t mixes the losses of token t+1 and of every later token (through attention), so g_t is what position t
*contributes* to the update, not the gradient of a token's own loss. With two-sided projections (LoGRA, Choe et al.
2024, "What is Your Data Worth to GPT?", sec. 3) x -> P_in x, dy -> P_out dy, the projected contributions
g~_t = (P_out dy_t)(P_in x_t)^T have

    <g~_s, g~_t> = (P_out dy_s . P_out dy_t) (P_in x_s . P_in x_t)           (exact for identity projections)
    dot_t = <g~_t, G~> = (P_out dy_t)^T G~ (P_in x_t),   G~ = sum_s g~_s
    norm_t = ||P_out dy_t|| ||P_in x_t||,   alignment_t = dot_t / (norm_t ||G~||)

per layer; over layers the dots add, and norms and ||G|| add in quadrature.

Per-token-loss gradients (new). For the traced parameters theta (the weights of the traced modules: the LoRA A/B
matrices by default), grad l_t, G = sum_t grad l_t = grad L, and a_t = <grad l_t, G> / (||grad l_t|| ||G||).
All dots at once: with h the final hidden states (after the last norm), l_t depends on h only through h_{t-1}, so
<grad l_t, G> = delta_{t-1} . (J_h G)_{t-1}, delta = dL/dh (one backward), J_h G = one forward-mode JVP of the decoder
along G (`torch.func.jvp`). Norms: one vector-Jacobian product per token (cotangent delta_{t-1} at row t-1), batched
with `is_grads_batched` on the causal prefix that token needs; or a k-direction estimate with the G-component
computed exactly: ||grad l_t||^2 = dot_t^2/||G||^2 + mean_j <grad l_t, v'_j>^2, v'_j = Rademacher directions with the
G-component removed; the relative std of the residual part's estimate is <= sqrt(2/k).

Forward-mode AD does not go through SDPA attention on CPU; `eager_attention(model)` switches the model to eager
attention for the duration (the callback does it for every trace).

Source: the reference study (per-position traces, categories, scheme weights); the per-token-loss quantity and its
JVP/VJP computation are this project's (issue 5).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
LORA_PATTERN = r"\.lora_[AB]\.[^.]+$"
DEFAULT_PATTERN = r"(^|\.)(q_proj|v_proj)$"


# ----------------------------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / `torch.compile` wrappers (a PeftModel is kept as is)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@dataclass
class ModelParts:
    """The pieces of a causal LM the tracer calls separately: embedding, decoder stack and output head.

    `head(h)` maps final hidden states `(B, T, H)` to logits `(B, T, V)` (lm_head, then the final-logit softcapping
    or logit scale of the model's config when it has one).
    """

    model: nn.Module
    base: nn.Module
    decoder: nn.Module
    embed: nn.Module
    lm_head: nn.Module
    softcap: float | None = None
    logit_scale: float | None = None

    def head(self, h: Tensor) -> Tensor:
        z = self.lm_head(h)
        if self.logit_scale is not None:
            z = z * self.logit_scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def hidden(self, input_ids: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Final hidden states `(1, T, H)` of `input_ids (1, T)`, with decoder parameters replaced by `params`.

        The embedding is called through `.forward` so that forward hooks on it (e.g. PEFT's
        `enable_input_require_grads`, which forward-mode AD cannot go through) do not run.
        """
        emb = self.embed.forward(input_ids)
        kwargs = {"inputs_embeds": emb, "use_cache": False}
        if params:
            out = torch.func.functional_call(self.decoder, params, (), kwargs, strict=False)
        else:
            out = self.decoder(**kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def model_parts(model: nn.Module) -> ModelParts:
    """Split a (PEFT-wrapped) causal LM into embedding, decoder and head.

    Raises:
        ValueError: the model has no `get_decoder()` / `get_output_embeddings()` (not a decoder-only causal LM).
    """
    model = unwrap_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
        lm_head = base.get_output_embeddings()
        embed = decoder.get_input_embeddings()
    except (AttributeError, NotImplementedError) as e:
        raise ValueError(f"{type(base).__name__}: tracing needs a decoder-only causal LM with get_decoder(), "
                         f"get_output_embeddings() and get_input_embeddings() ({e})") from None
    if decoder is None or lm_head is None or embed is None:
        raise ValueError(f"{type(base).__name__}: tracing needs a decoder-only causal LM (decoder/head not found)")
    cfg = getattr(base, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    scale = getattr(base, "logit_scale", None)  # e.g. Cohere multiplies the logits by a float from its config
    scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    return ModelParts(model, base, decoder, embed, lm_head, softcap, scale)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a model to eager attention for the block, restoring the previous implementation after.

    Forward-mode AD (`torch.func.jvp`) is not implemented for SDPA's fused kernels (e.g. on CPU); eager attention
    computes the same function.
    """
    base = model_parts(model).base
    cfg = getattr(base, "config", None)
    prev = getattr(cfg, "_attn_implementation", None)
    if prev in (None, "eager") or not hasattr(base, "set_attn_implementation"):
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(prev)


def select_trace_modules(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules to trace, by name (in model order).

    Args:
        model: a causal LM, PEFT-wrapped or not (DDP wrappers are stripped).
        pattern: regex searched (`re.search`) in module names. None = auto: the LoRA A/B Linear modules of the active
            adapter(s) when the model has LoRA modules, else `(^|\\.)(q_proj|v_proj)$`.

    Returns:
        name -> module, names as in `model.named_modules()`.

    Raises:
        ValueError: nothing matches (the message lists a few Linear module names), or a match lies outside the
            decoder stack (e.g. `lm_head`, which the per-token-loss computation keeps fixed).
    """
    model = unwrap_model(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if pattern is None:
        lora = [n for n, _ in linears if re.search(LORA_PATTERN, n)]
        if lora:
            active = getattr(model, "active_adapters", None)
            if callable(active):  # transformers' PeftAdapterMixin exposes it as a method
                active = active()
            names = "|".join(re.escape(a) for a in (active or [])) or "[^.]+"
            pattern = rf"\.lora_[AB]\.({names})$"
        else:
            pattern = DEFAULT_PATTERN
    rx = re.compile(pattern)
    mods = {n: m for n, m in linears if rx.search(n)}
    if not mods:
        sample = ", ".join(n for n, _ in linears[:8])
        raise ValueError(f"--trace_modules {pattern!r} matches no nn.Linear module; some names: {sample}")
    decoder_params = {id(p) for p in model_parts(model).decoder.parameters()}
    outside = [n for n, m in mods.items() if id(m.weight) not in decoder_params]
    if outside:
        raise ValueError(f"--trace_modules {pattern!r} matches modules outside the decoder stack: {outside[:4]}; "
                         "only layers of the decoder (attention / MLP / LoRA) can be traced")
    return mods


def decoder_param_names(parts: ModelParts, tensors: list[Tensor]) -> list[str]:
    """Names (relative to `parts.decoder`) of the given parameter tensors, matched by identity.

    Raises:
        ValueError: a tensor is not a parameter of the decoder stack.
    """
    names = {id(p): n for n, p in parts.decoder.named_parameters(remove_duplicate=False)}
    out = []
    for t in tensors:
        if id(t) not in names:
            raise ValueError("traced parameter is not a parameter of the decoder stack")
        out.append(names[id(t)])
    return out


def _as_batch(x: Tensor | list, device) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.long, device=device)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"expected one sequence of shape (T,) or (1, T), got {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------------------------------
# projections
# ----------------------------------------------------------------------------------------------------------------
def layer_seed(seed: int, name: str, side: str) -> int:
    """Deterministic 63-bit seed of one projection matrix (independent of process, device and Python hashing)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()[:8], "little") >> 1


def rademacher(k: int, d: int, seed: int, *, dtype=torch.float32, device=None) -> Tensor:
    """A `(k, d)` Rademacher matrix with entries +-1/sqrt(k) (so E[P^T P] = I), from a seeded CPU generator."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    m = torch.randint(0, 2, (k, d), generator=g, dtype=torch.int8).to(dtype).mul_(2).sub_(1).div_(math.sqrt(k))
    return m.to(device)


@dataclass
class Projector:
    """Two-sided per-layer projections of the layer input x (`d_in`) and output gradient dy (`d_out`).

    `mats[name] = (P_in, P_out)`, each `(k, d)` or None for the identity (a side is kept as is when k >= d).
    """

    mats: dict[str, tuple[Tensor | None, Tensor | None]] = field(default_factory=dict)
    seed: int = 0
    factor: int = 1
    max_dim: int = 0

    @staticmethod
    def side_dim(d: int, factor: int = 1, max_dim: int = 0) -> int:
        """Projected dims of one side: min(d, ceil(d / factor), max_dim if > 0)."""
        k = math.ceil(d / max(1, factor))
        if max_dim > 0:
            k = min(k, max_dim)
        return min(d, k)

    @classmethod
    def build(cls, modules: dict[str, nn.Linear], *, factor: int = 1, max_dim: int = 0, seed: int = 0) -> Projector:
        """Rademacher projections seeded by (seed, layer name, side), sized by `factor` / `max_dim`."""
        mats = {}
        for name, m in modules.items():
            sides = []
            for side, d in (("in", m.in_features), ("out", m.out_features)):
                k = cls.side_dim(d, factor, max_dim)
                sides.append(None if k >= d else rademacher(k, d, layer_seed(seed, name, side)))
            mats[name] = (sides[0], sides[1])
        return cls(mats, seed, factor, max_dim)

    @classmethod
    def identity(cls, modules: dict[str, nn.Linear]) -> Projector:
        return cls({n: (None, None) for n in modules})

    def project(self, name: str, x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
        """`(T, d_in)`, `(T, d_out)` -> `(T, k_in)`, `(T, k_out)`."""
        p_in, p_out = self.mats.get(name, (None, None))
        if p_in is not None:
            x = x @ p_in.to(device=x.device, dtype=x.dtype).T
        if p_out is not None:
            dy = dy @ p_out.to(device=dy.device, dtype=dy.dtype).T
        return x, dy

    def dims(self, modules: dict[str, nn.Linear]) -> dict[str, list[int]]:
        out = {}
        for n, m in modules.items():
            p_in, p_out = self.mats.get(n, (None, None))
            out[n] = [m.in_features if p_in is None else p_in.shape[0], m.out_features if p_out is None else p_out.shape[0]]
        return out

    @property
    def kind(self) -> str:
        return "identity" if all(a is None and b is None for a, b in self.mats.values()) else "rademacher-two-sided"


# ----------------------------------------------------------------------------------------------------------------
# one forward + backward
# ----------------------------------------------------------------------------------------------------------------
def upcast(t: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def token_stats(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-token loss statistics in the token frame (token t's values come from the logits at t-1).

    Args:
        logits: `(T, V)` (half precision is computed in float32, float32/float64 as is).
        labels: `(T,)` long, IGNORE_INDEX (-100) on non-targets; label t is the target of logits t-1.

    Returns:
        dict of `(T,)` tensors: `mask` (bool; t >= 1 and labels[t] != -100), `loss` (nats, differentiable, 0 off the
        mask), `log_probs`, `p`, `entropy` (nats; detached, 0 off the mask).
    """
    T = labels.shape[0]
    mask = torch.zeros(T, dtype=torch.bool, device=labels.device)
    mask[1:] = labels[1:] != IGNORE_INDEX
    logp = torch.log_softmax(upcast(logits[:-1]), dim=-1)  # (T-1, V): predicts tokens 1..T-1
    tgt = labels[1:].clamp(min=0)
    lp = torch.zeros(T, dtype=logp.dtype, device=logits.device)
    lp[1:] = logp.gather(-1, tgt[:, None])[:, 0]
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    with torch.no_grad():
        ent = torch.zeros(T, dtype=logp.dtype, device=logits.device)
        ent[1:] = -(logp.exp() * logp).sum(-1)
        ent = torch.where(mask, ent, torch.zeros_like(ent))
    return {"mask": mask, "loss": -lp, "log_probs": lp.detach(), "p": lp.detach().exp(), "entropy": ent}


@dataclass
class Capture:
    """Result of one forward + backward of L = sum_t l_t over a sequence (see `forward_backward`)."""

    stats: dict[str, Tensor]  # token_stats (detached), (T,)
    delta: Tensor  # (T, H) dL/dh, row s = d l_{s+1} / d h_s
    G: dict[str, Tensor]  # decoder param name -> dL/dtheta (same shape as the weight)
    x: dict[str, Tensor] = field(default_factory=dict)  # module name -> (T, d_in) layer input
    dy: dict[str, Tensor] = field(default_factory=dict)  # module name -> (T, d_out) dL/d(layer output)


def forward_backward(parts: ModelParts, input_ids: Tensor, labels: Tensor, weights: dict[str, Tensor],
                     modules: dict[str, nn.Linear] | None = None) -> Capture:
    """One forward with (optional) hooks on `modules` and one `torch.autograd.grad` of L = sum of target losses.

    Nothing is accumulated into `.grad`: the weights are replaced by detached leaves through
    `torch.func.functional_call`, and gradients are taken with `torch.autograd.grad` (no `AccumulateGrad`, hence no
    DDP reducer hooks either).

    Args:
        parts: `model_parts(model)`.
        input_ids, labels: `(1, T)` long.
        weights: decoder parameter name -> tensor (the traced parameter set theta).
        modules: Linear modules whose input x and output gradient dy are captured (per-position quantity).

    Returns:
        `Capture` with float tensors on the model's device.
    """
    leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
    xs, ys = {}, {}
    handles = []
    seen: set[str] = set()

    def make_hook(name):
        def hook(mod, inp, out):
            if name in seen:
                raise RuntimeError(f"traced module {name} is called more than once per forward; trace another one")
            seen.add(name)
            xs[name] = inp[0].detach()
            ys[name] = out
        return hook

    for name, m in (modules or {}).items():
        handles.append(m.register_forward_hook(make_hook(name)))
    try:
        with torch.enable_grad():
            h = parts.hidden(input_ids, leaves)  # (1, T, H)
            logits = parts.head(h)[0]  # (T, V)
            stats = token_stats(logits, labels[0])
            L = stats["loss"].sum()
            del logits
            names = list(ys)
            missing = [n for n in (modules or {}) if n not in ys]
            if missing:
                raise RuntimeError(f"traced modules not called in the forward pass: {missing[:4]}")
            inputs = [h] + list(leaves.values()) + [ys[n] for n in names]
            grads = torch.autograd.grad(L, inputs, allow_unused=True)
    finally:
        for hd in handles:
            hd.remove()
    zero = lambda g, ref: torch.zeros_like(ref) if g is None else g  # noqa: E731
    delta = zero(grads[0], h)[0].detach()
    nw = len(leaves)
    G = {n: zero(g, leaves[n]).detach() for n, g in zip(leaves, grads[1 : 1 + nw])}
    dy = {n: zero(g, ys[n])[0].detach() for n, g in zip(names, grads[1 + nw :])}
    x = {n: xs[n][0] for n in names}
    stats = {k: v.detach() for k, v in stats.items()}
    return Capture(stats, delta, G, x, dy)


# ----------------------------------------------------------------------------------------------------------------
# per-position
# ----------------------------------------------------------------------------------------------------------------
def position_alignment(x: Tensor, dy: Tensor) -> dict[str, Tensor]:
    """Per-position contributions of one layer from (projected) inputs and output gradients.

    Args:
        x: `(T, k_in)` layer inputs (or their projections), one row per position.
        dy: `(T, k_out)` output gradients (or projections).

    Returns:
        `dot` (T,) <g_t, G>, `norm` (T,) ||g_t|| = ||dy_t|| ||x_t||, `alignment` (T,) cosine (NaN where ||g_t|| or
        ||G|| is 0),
        `G_norm` () ||G||, with g_t = dy_t x_t^T and G = sum_t g_t. Computed in the inputs' dtype (half
        precision upcast to float32), returned as float32. Cost: 2 T k_in k_out multiply-adds (no T x T Gram matrix).
    """
    x, dy = upcast(x), upcast(dy)
    G = dy.T @ x  # (k_out, k_in)
    dot = ((dy @ G) * x).sum(-1)  # (T,) dy_t^T G x_t
    norm = dy.norm(dim=-1) * x.norm(dim=-1)
    g_norm = G.norm()
    ok = (norm > 0) & (g_norm > 0)
    align = torch.where(ok, dot / (norm * g_norm).clamp_min(1e-300), torch.full_like(dot, math.nan))
    return {"dot": dot.float(), "norm": norm.float(), "alignment": align.float(), "G_norm": g_norm.float()}


def aggregate_layers(per_layer: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Combine per-layer `position_alignment` results: dots add, norms and ||G|| add in quadrature.

    Returns `dot`, `norm`, `alignment`, `G_norm` over all layers and `layer.dot/norm/alignment` `(L, T)`,
    `layer.G_norm` `(L,)`.
    """
    dots = torch.stack([r["dot"] for r in per_layer]).double()  # (L, T)
    norms = torch.stack([r["norm"] for r in per_layer]).double()
    gn = torch.stack([r["G_norm"] for r in per_layer]).double()  # (L,)
    dot, norm, g = dots.sum(0), norms.square().sum(0).sqrt(), gn.square().sum().sqrt()
    align = torch.where((norm > 0) & (g > 0), dot / (norm * g).clamp_min(1e-300), torch.full_like(dot, math.nan))
    return {
        "dot": dot.float(), "norm": norm.float(), "alignment": align.float(), "G_norm": g.float(),
        "layer.dot": dots.float(), "layer.norm": norms.float(),
        "layer.alignment": torch.stack([r["alignment"] for r in per_layer]), "layer.G_norm": gn.float(),
    }


def per_position_from_capture(cap: Capture, projector: Projector, *, keep_projections: bool = False) -> dict:
    """Per-position quantities of every captured layer, aggregated (see `aggregate_layers`).

    Returns the `aggregate_layers` dict plus `layers` (names, in capture order) and, with `keep_projections`,
    `x_proj` / `dy_proj`: lists of `(T, k)` float32 tensors per layer.
    """
    names = list(cap.x)
    per_layer, xp, dyp = [], [], []
    for n in names:
        x, dy = projector.project(n, upcast(cap.x[n]), upcast(cap.dy[n]))
        per_layer.append(position_alignment(x, dy))
        if keep_projections:
            xp.append(x.float().cpu())
            dyp.append(dy.float().cpu())
    out = {k: v.cpu() for k, v in aggregate_layers(per_layer).items()}
    out["layers"] = names
    if keep_projections:
        out["x_proj"], out["dy_proj"] = xp, dyp
    return out


def trace_per_position(model: nn.Module, input_ids, labels, modules: dict[str, nn.Linear] | None = None,
                       projector: Projector | None = None, *, keep_projections: bool = False) -> dict:
    """Per-position gradient contributions g_t = dy_t x_t^T of the traced Linear layers for one sequence.

    Args:
        model: causal LM (PEFT or not); use `.eval()` for results without dropout.
        input_ids, labels: `(T,)` or `(1, T)` long; labels -100 on non-targets (HF convention, unshifted).
        modules: Linear modules to trace (default `select_trace_modules(model)`).
        projector: default identity (exact values).
        keep_projections: also return the `(T, k)` projections `x_proj` / `dy_proj` per layer.

    Returns:
        dict: `dot`, `norm`, `alignment` `(T,)` (index t = position t, over all positions; a position with no
        gradient has alignment NaN), `G_norm` (), `layer.*` per layer, `layers`, `G` (decoder param name -> exact
        dL/dW of each traced weight, which equals sum_t dy_t x_t^T), `stats` (`token_stats`).
        L is the *sum* of the target losses.
    """
    parts = model_parts(model)
    modules = modules if modules is not None else select_trace_modules(model)
    projector = projector or Projector.identity(modules)
    device = next(parts.decoder.parameters()).device
    ids, lab = _as_batch(input_ids, device), _as_batch(labels, device)
    ws = [m.weight for m in modules.values()]
    weights = dict(zip(decoder_param_names(parts, ws), ws))
    cap = forward_backward(parts, ids, lab, weights, modules)
    out = per_position_from_capture(cap, projector, keep_projections=keep_projections)
    out["G"] = cap.G
    out["stats"] = cap.stats
    return out


# ----------------------------------------------------------------------------------------------------------------
# per-token-loss gradients
# ----------------------------------------------------------------------------------------------------------------
def _resolve_params(model: nn.Module, parts: ModelParts, params) -> dict[str, Tensor]:
    if params is None:
        ws = [m.weight for m in select_trace_modules(model).values()]
    elif isinstance(params, dict):
        ws = list(params.values())
    else:
        ws = list(params)
    if not ws:
        raise ValueError("per_token_loss_alignment: empty parameter set")
    return dict(zip(decoder_param_names(parts, ws), ws))


def _tree_dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a)


def _jvp_rows(parts: ModelParts, ids: Tensor, weights: dict[str, Tensor], tangents: list[dict[str, Tensor]],
              delta: Tensor) -> Tensor:
    """<grad l_{s+1}, v> for every position s and tangent v: `(n_tangents, T)` float64 (row s = token s+1)."""
    w = {n: t.detach() for n, t in weights.items()}

    def f(p):
        return parts.hidden(ids, p)[0]  # (T, H)

    with torch.no_grad():
        if len(tangents) == 1:
            _, dh = torch.func.jvp(f, (w,), (tangents[0],))
            dh = dh[None]
        else:
            stacked = {n: torch.stack([t[n] for t in tangents]) for n in w}
            dh = torch.func.vmap(lambda t: torch.func.jvp(f, (w,), (t,))[1])(stacked)  # (n, T, H)
    return (dh.double() * delta.double()[None]).sum(-1)


def _to_token_frame(rows: Tensor) -> Tensor:
    """Position frame (row s = token s+1) -> token frame (index t, t = 0 gets 0)."""
    out = torch.zeros_like(rows)
    out[..., 1:] = rows[..., :-1]
    return out


def exact_norms(parts: ModelParts, ids: Tensor, weights: dict[str, Tensor], delta: Tensor, mask: Tensor,
                 batch_size: int, G: dict[str, Tensor], progress: bool = False) -> tuple[Tensor, Tensor]:
    """||grad l_t||^2 and <grad l_t, G> `(T,)` float64 CPU for the targets in `mask`, by batched VJPs.

    Token t's gradient is the VJP of the decoder output with cotangent delta_{t-1} at row t-1 (zero elsewhere); a
    chunk of `batch_size` targets is evaluated together (`is_grads_batched`) on a forward of the causal prefix
    `0..max(t)-1` the chunk needs, which about halves the work of a full-length backward per token.
    """
    T = ids.shape[1]
    sq = torch.zeros(T, dtype=torch.float64)
    dots = torch.zeros(T, dtype=torch.float64)
    targets = torch.nonzero(mask.cpu(), as_tuple=False)[:, 0].tolist()
    chunks = [targets[i : i + batch_size] for i in range(0, len(targets), batch_size)]
    it = chunks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc="per-token gradient norms", unit="chunk", leave=False)
    for chunk in it:
        m = max(chunk)  # token m needs positions 0..m-1
        leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
        with torch.enable_grad():
            h = parts.hidden(ids[:, :m], leaves)  # (1, m, H)
            cot = torch.zeros((len(chunk), *h.shape), dtype=h.dtype, device=h.device)  # (c, 1, m, H)
            for i, t in enumerate(chunk):
                cot[i, 0, t - 1] = delta[t - 1]
            grads = torch.autograd.grad(h, list(leaves.values()), grad_outputs=cot, is_grads_batched=True,
                                        allow_unused=True)
        for name, g in zip(leaves, grads):
            if g is None:
                continue
            g = g.double().flatten(1)  # (c, P)
            sq[chunk] += g.square().sum(1).cpu()
            dots[chunk] += (g @ G[name].double().flatten()).cpu()
        del h, cot, grads, leaves
    return sq, dots


def _brute_force(parts: ModelParts, ids: Tensor, labels: Tensor, weights: dict[str, Tensor], progress=False):
    leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
    with torch.enable_grad():
        stats = token_stats(parts.head(parts.hidden(ids, leaves))[0], labels[0])
        T = ids.shape[1]
        targets = torch.nonzero(stats["mask"], as_tuple=False)[:, 0].tolist()
        it = targets
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(targets, desc="brute-force per-token gradients", unit="tok", leave=False)
        grads = {}
        for t in it:
            g = torch.autograd.grad(stats["loss"][t], list(leaves.values()), retain_graph=True, allow_unused=True)
            grads[t] = torch.cat([(torch.zeros_like(v) if gi is None else gi).double().flatten()
                                  for gi, v in zip(g, leaves.values())])
    G = sum(grads.values()) if grads else None
    dot = torch.zeros(T, dtype=torch.float64)
    sq = torch.zeros(T, dtype=torch.float64)
    for t, g in grads.items():
        dot[t] = (g @ G).cpu()
        sq[t] = g.square().sum().cpu()
    g_norm = G.norm().cpu() if G is not None else torch.tensor(0.0, dtype=torch.float64)
    return dot, sq, g_norm, {k: v.detach() for k, v in stats.items()}


def dots_jvp(parts: ModelParts, ids: Tensor, weights: dict[str, Tensor], cap: Capture) -> Tensor:
    """<grad l_t, G> for all t with one forward-mode JVP of the decoder along G: `(T,)` float64 CPU, token frame.

    Uses the block structure of dl/dh: <grad l_t, G> = delta_{t-1} . (J_h G)_{t-1}.
    """
    G = {n: cap.G[n] for n in weights}
    return _to_token_frame(_jvp_rows(parts, ids, weights, [G], cap.delta)[0]).cpu()


def dots_double_backward(parts: ModelParts, ids: Tensor, labels: Tensor, weights: dict[str, Tensor],
                         G: dict[str, Tensor]) -> Tensor:
    """<grad l_t, G> for all t as d/du <grad_theta sum_t u_t l_t, G> at u = 1 (double backward): `(T,)` float64."""
    leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
    with torch.enable_grad():
        stats = token_stats(parts.head(parts.hidden(ids, leaves))[0], labels[0])
        u = torch.ones(ids.shape[1], dtype=stats["loss"].dtype, device=ids.device, requires_grad=True)
        g = torch.autograd.grad((u * stats["loss"]).sum(), list(leaves.values()), create_graph=True,
                                allow_unused=True)
        s = sum((gi * G[n]).sum() for gi, n in zip(g, leaves) if gi is not None)
        return torch.autograd.grad(s, u)[0].double().cpu()


def per_token_loss_alignment(
    model: nn.Module,
    input_ids,
    labels,
    params=None,
    *,
    method: str = "jvp",
    norms: str = "exact",
    num_directions: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    return_projection: bool = False,
    capture: Capture | None = None,
    progress: bool = False,
) -> dict:
    """Alignment of each token's own-loss gradient with the sequence gradient, for one sequence.

    a_t = <grad l_t, G> / (||grad l_t|| ||G||), G = sum_t grad l_t, gradients w.r.t. `params` (the traced parameter
    set; default: the weights of `select_trace_modules(model)`, i.e. the LoRA matrices under PEFT).

    Args:
        model: causal LM (PEFT or not), ideally in `.eval()`; `method="jvp"` or `norms="projection"` need
            forward-mode AD, so SDPA models should be wrapped in `eager_attention(model)`.
        input_ids, labels: `(T,)` or `(1, T)` long; labels -100 on non-targets.
        params: parameters of the decoder (dict name -> Parameter, or an iterable of Parameters).
        method: `jvp` (one backward for G and delta + one forward-mode JVP along G; ~1.7 training steps),
            `double_backward` (d/du of <grad(sum_t u_t l_t), G>), or `brute` (one backward per token).
        norms: `exact` (one VJP per target, batched by `batch_size` on the prefix the chunk needs), `projection`
            (||grad l_t||^2 = dot_t^2/||G||^2 + mean_j <grad l_t, v'_j>^2 over `num_directions` Rademacher directions
            v'_j orthogonal to G: unbiased, relative std of the residual term <= sqrt(2/k)), or `brute`.
        return_projection: also return `grad_proj` `(T, k)`: <grad l_t, v_j>/sqrt(k) for k Rademacher directions
            v_j (so grad_proj grad_proj^T ~ the Gram matrix of the per-token gradients); costs k JVPs unless
            `norms="projection"` already ran them.
        capture: a `forward_backward` result with these `params` (reuses its G and delta; the callback shares one
            forward/backward with the per-position trace).

    Returns:
        dict of CPU tensors: `dot`, `norm`, `alignment` `(T,)` float32 in the token frame (0 / NaN on non-targets),
        `G_norm` () float32, `stats` (`token_stats`), optionally `grad_proj` `(T, k)`.

    Raises:
        ValueError: unknown method / norms, or parameters outside the decoder stack.
    """
    if method not in ("jvp", "double_backward", "brute"):
        raise ValueError(f"method must be jvp, double_backward or brute, got {method!r}")
    if norms not in ("exact", "projection", "brute"):
        raise ValueError(f"norms must be exact, projection or brute, got {norms!r}")
    parts = model_parts(model)
    device = next(parts.decoder.parameters()).device
    ids, lab = _as_batch(input_ids, device), _as_batch(labels, device)
    weights = _resolve_params(model, parts, params)

    if method == "brute" or norms == "brute":
        b_dot, b_sq, b_gn, b_stats = _brute_force(parts, ids, lab, weights, progress)
    if method == "brute" and norms == "brute" and not return_projection:
        return _finish(b_dot, b_sq, b_gn, b_stats)

    cap = capture if capture is not None else forward_backward(parts, ids, lab, weights)
    G = {n: cap.G[n] for n in weights}
    g_sq = _tree_dot(G, G)
    mask = cap.stats["mask"]

    if method == "jvp":
        dot = dots_jvp(parts, ids, weights, cap)
    elif method == "double_backward":
        dot = dots_double_backward(parts, ids, lab, weights, G)
    else:
        dot = b_dot

    grad_proj = None
    if norms == "exact":
        sq, _ = exact_norms(parts, ids, weights, cap.delta, mask, batch_size, G, progress)
    elif norms == "brute":
        sq = b_sq
    if norms == "projection" or return_projection:
        k = num_directions
        r, coefs = _residual_projections(parts, ids, weights, G, g_sq, cap.delta, k, seed, batch_size)
        if norms == "projection":
            sq = (dot.square() / g_sq.cpu() if g_sq > 0 else torch.zeros_like(dot)) + r.square().mean(0)
        if return_projection:
            grad_proj = ((r + coefs[:, None] * dot[None]) / math.sqrt(k)).T

    out = _finish(dot, sq, g_sq.sqrt().cpu(), cap.stats, mask)
    if grad_proj is not None:
        grad_proj = torch.where(mask.cpu()[:, None], grad_proj, torch.zeros_like(grad_proj))
        out["grad_proj"] = grad_proj.float()
    return out


def _residual_projections(parts: ModelParts, ids: Tensor, weights: dict[str, Tensor], G: dict[str, Tensor],
                          g_sq: Tensor, delta: Tensor, k: int, seed: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """<grad l_t, v'_j> `(k, T)` float64 CPU (token frame) for k Rademacher directions v_j with their component along
    G removed (v'_j = v_j - c_j G, c_j = <v_j, G>/||G||^2; returned as `(k,)`), by `batch_size` JVPs at a time.

    E[<g, v'>^2] = ||g||^2 - <g, G>^2/||G||^2 for Rademacher v, so d_t^2/||G||^2 + mean_j <grad l_t, v'_j>^2 is an
    unbiased estimate of ||grad l_t||^2 whose residual term has relative std <= sqrt(2/k). The directions are drawn
    from `seed` (the same for every call with that seed).
    """
    device = next(iter(weights.values())).device
    rows, coefs = [], []
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, "tokloss", "directions"))
    for start in range(0, k, batch_size):
        tangents = []
        for _ in range(min(batch_size, k - start)):
            v = {n: (torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).to(w.dtype) * 2 - 1).to(device)
                 for n, w in weights.items()}
            c = (_tree_dot(v, G) / g_sq).item() if g_sq > 0 else 0.0
            tangents.append({n: v[n] - c * G[n] for n in v})  # component along G removed
            coefs.append(c)
        rows.append(_to_token_frame(_jvp_rows(parts, ids, weights, tangents, delta)).cpu())
    return torch.cat(rows), torch.tensor(coefs, dtype=torch.float64)


def _finish(dot: Tensor, sq: Tensor, g_norm: Tensor, stats: dict, mask: Tensor | None = None) -> dict:
    mask = (stats["mask"] if mask is None else mask).cpu()
    dot = torch.where(mask, dot.double().cpu(), torch.zeros_like(dot, dtype=torch.float64))
    norm = torch.where(mask, sq.double().cpu().clamp_min(0).sqrt(), torch.zeros_like(dot))
    g = g_norm.double()
    align = torch.where(mask & (norm > 0) & (g > 0), dot / (norm * g).clamp_min(1e-300),
                        torch.full_like(dot, math.nan))
    return {"dot": dot.float(), "norm": norm.float(), "alignment": align.float(), "G_norm": g.float(),
            "stats": {k: v.cpu() for k, v in stats.items()}}


# ----------------------------------------------------------------------------------------------------------------
# a whole micro-batch (for training on the alignment: the `sft-align` scheme and the premise metrics)
# ----------------------------------------------------------------------------------------------------------------
def trainable_decoder_params(model: nn.Module) -> dict[str, Tensor]:
    """The trainable weights of the decoder stack by name (LoRA matrices under PEFT; every decoder weight under full
    fine-tuning except the input embedding, which `ModelParts.hidden` calls outside the functional call).

    Raises:
        ValueError: no trainable weight inside the decoder stack.
    """
    parts = model_parts(model)
    embed = {id(p) for p in parts.embed.parameters()}
    ws = [p for p in parts.decoder.parameters() if p.requires_grad and id(p) not in embed]
    if not ws:
        raise ValueError("no trainable weight inside the decoder stack: the token alignment needs one")
    return dict(zip(decoder_param_names(parts, ws), ws))


def micro_batch_alignment(model: nn.Module, input_ids: Tensor, labels: Tensor,
                          attention_mask: Tensor | None = None, params: dict[str, Tensor] | None = None, *,
                          norm_directions: int = 0, seed: int = 0) -> Tensor:
    """d_t = <grad l_t, G> for every target of a micro-batch, G = grad of the sum of all its target losses; with
    `norm_directions` k > 0 the cosine a_t = d_t / (||grad l_t|| ||G||) instead, ||grad l_t|| estimated.

    Exact, in float64 accumulation: one forward + backward per row gives its dl/dh and its share of G, then one
    forward-mode JVP per row along the summed G gives every d_t of the row (the `jvp` method of
    `per_token_loss_alignment`, with G the micro-batch's aggregate instead of the sequence's). Gradients are taken
    with respect to `params` (default `trainable_decoder_params`), nothing reaches `.grad`. Call it in eval mode with
    eager attention (`tokensft.tracing.callback.trace_guard`): forward-mode AD has no SDPA/flash kernels.

    Args:
        model: causal LM (PEFT or not).
        input_ids, labels: `(B, T)` long, right padded; labels -100 on non-targets (HF convention, unshifted).
        attention_mask: `(B, T)`, 1 on real tokens (None: every position is real). Packed rows are not supported.
        params: decoder parameter name -> tensor.
        norm_directions: 0 (d_t, exact), or k: return the cosine, with ||grad l_t||^2 estimated as
            d_t^2/||G||^2 + mean_j <grad l_t, v'_j>^2 over k Rademacher directions orthogonal to G (k more JVP
            tangents per row; unbiased, relative std of the residual term <= sqrt(2/k); the sign is exact, and
            |a_t| <= 1 by construction). Approximate: the exact norm needs a backward per token.
        seed: seed of those directions (the same directions for every row and call).

    Returns:
        `(B, T-1)` float32 in the frame of the shifted targets (`[:, s]` is target `labels[:, s + 1]`), in
        nats x (the units of G) (or the dimensionless cosine): 0 off the targets.

    Source: ours (the reference study's premise made measurable; issue: test the premise directly).
    """
    model = unwrap_model(model)
    parts = model_parts(model)
    weights = params if params is not None else trainable_decoder_params(model)
    B, T = input_ids.shape
    lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [T] * B
    rows = [(input_ids[b : b + 1, : int(n)], labels[b : b + 1, : int(n)]) for b, n in enumerate(lengths)]
    caps = [forward_backward(parts, ids, lab, weights) for ids, lab in rows]
    G = {n: sum(c.G[n] for c in caps) for n in weights}
    g_sq = _tree_dot(G, G)
    out = torch.zeros(B, T, dtype=torch.float32)
    for b, ((ids, _), cap) in enumerate(zip(rows, caps)):
        if ids.shape[1] < 2:
            continue
        d = _to_token_frame(_jvp_rows(parts, ids, weights, [G], cap.delta)[0]).cpu()  # (n,) token frame
        if norm_directions > 0:
            r, _ = _residual_projections(parts, ids, weights, G, g_sq, cap.delta, norm_directions, seed,
                                         norm_directions)
            gs = g_sq.cpu()
            sq = d.square() / gs + r.square().mean(0) if gs > 0 else torch.zeros_like(d)
            d = torch.where(sq > 0, d / (sq * gs).sqrt().clamp_min(1e-300), torch.zeros_like(d))
        out[b, : ids.shape[1]] = torch.where(cap.stats["mask"].cpu(), d, torch.zeros_like(d)).float()
    return out[:, 1:].to(input_ids.device)
