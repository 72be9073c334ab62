"""Tracer math against slow references: brute-force per-token backward passes, `vmap(grad)` per-position
contributions, closed forms, and the Johnson-Lindenstrauss behaviour of the projections."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_model
from tokensft.tracing.core import (
    Projector,
    aggregate_layers,
    decoder_param_names,
    eager_attention,
    model_parts,
    per_token_loss_alignment,
    position_alignment,
    rademacher,
    select_trace_modules,
    token_stats,
    trace_per_position,
)

from .conftest import lora_model, sequence


def _close(a, b, tol):
    """|a - b| <= tol * max(1, max |b|) over the finite entries, and the same NaN pattern."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    fin = torch.isfinite(b)
    scale = max(1.0, b[fin].abs().max().item()) if fin.any() else 1.0
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


# --------------------------------------------------------------------------------------------------------------
# per-token-loss gradients
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("method", ["jvp", "double_backward"])
def test_per_token_loss_equals_brute_force(kind, method):
    model = lora_model(0) if kind == "lora" else tiny_model(0, attn="eager").eval()
    ids, labels = sequence(T=23, prompt=7)
    ref = per_token_loss_alignment(model, ids, labels, method="brute", norms="brute")
    got = per_token_loss_alignment(model, ids, labels, method=method, norms="exact", batch_size=5)
    mask = ref["stats"]["mask"]
    assert mask.sum() == 16 and not mask[0]
    for key in ("dot", "norm", "alignment"):
        _close(got[key], ref[key], 1e-4)
    _close(got["G_norm"], ref["G_norm"], 1e-5)
    # the alignments are not trivial: both signs occur and they differ between tokens
    a = ref["alignment"][mask]
    assert a.std() > 0.05 and ref["norm"][mask].min() > 0
    assert torch.isnan(ref["alignment"][~mask]).all()


def test_per_token_loss_default_params_are_lora_matrices(peft_model):
    """Default parameter set under PEFT = the LoRA A/B weights, i.e. the trainable parameters."""
    ids, labels = sequence()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    a = per_token_loss_alignment(peft_model, ids, labels, norms="exact")
    b = per_token_loss_alignment(peft_model, ids, labels, trainable, method="brute", norms="brute")
    _close(a["alignment"], b["alignment"], 1e-4)


def test_projection_norms_error_shrinks_with_directions(peft_model):
    """||grad l_t||^2 from k random JVPs: the G-component is exact, the residual estimate has relative std
    <= sqrt(2/k); the RMS error over tokens shrinks as k grows and stays within 2x the bound."""
    ids, labels = sequence(T=30, prompt=4)
    ref = per_token_loss_alignment(peft_model, ids, labels, method="brute", norms="brute")
    mask = ref["stats"]["mask"]
    errs = {}
    for k in (8, 128):
        got = per_token_loss_alignment(peft_model, ids, labels, norms="projection", num_directions=k, batch_size=64,
                                       seed=3)
        rel = (got["norm"][mask].double() ** 2 - ref["norm"][mask].double() ** 2) / ref["norm"][mask].double() ** 2
        errs[k] = rel.square().mean().sqrt().item()
        assert errs[k] <= 2 * math.sqrt(2 / k), (k, errs[k])
        # the G component is computed exactly, so the estimate never falls below |dot| / ||G||
        assert (got["norm"][mask] >= got["dot"][mask].abs() / got["G_norm"] * (1 - 1e-5)).all()
        _close(got["dot"], ref["dot"], 1e-4)
    assert errs[128] < errs[8] / 2


def test_grad_proj_preserves_gram_diagonal(peft_model):
    """tokloss.grad_proj rows: E ||grad_proj_t||^2 = ||grad l_t||^2 (JL projection of the per-token gradients)."""
    ids, labels = sequence(T=16, prompt=3)
    ref = per_token_loss_alignment(peft_model, ids, labels, norms="exact")
    got = per_token_loss_alignment(peft_model, ids, labels, norms="exact", return_projection=True,
                                   num_directions=256, batch_size=64)
    mask = ref["stats"]["mask"]
    assert got["grad_proj"].shape == (16, 256)
    est = got["grad_proj"].double().square().sum(1)[mask]
    rel = (est / ref["norm"][mask].double() ** 2 - 1).abs()
    assert rel.max() < 4 * math.sqrt(2 / 256)
    assert (got["grad_proj"][~mask] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# per-position contributions
# --------------------------------------------------------------------------------------------------------------
def _vmap_grad_contributions(model, ids, labels, module):
    """g_t = dL/dD_t at D = 0, where only position t of `module`'s output gets + D_t x_t: vmap over t of grad."""
    state = {}

    def hook(mod, inp, out):
        return out + state["onehot"][None, :, None] * (inp[0] @ state["D"].T)

    handle = module.register_forward_hook(hook)
    target = labels[1:].clamp(min=0)
    keep = (labels[1:] != -100).to(model.dtype)

    def loss(D, onehot):
        state["D"], state["onehot"] = D, onehot
        logits = model(input_ids=ids[None]).logits[0]
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, target[:, None])[:, 0]
        return -(logp * keep).sum()

    try:
        eye = torch.eye(ids.shape[0], dtype=model.dtype)
        D0 = torch.zeros_like(module.weight)
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(D0, eye)  # (T, d_out, d_in)
    finally:
        handle.remove()


def test_per_position_hook_gradients_equal_vmap_grad():
    model = lora_model(0, dtype=torch.float64)
    ids, labels = sequence(T=13, prompt=4)
    mods = select_trace_modules(model)
    out = trace_per_position(model, ids, labels, mods, keep_projections=True)
    for li, m in enumerate(mods.values()):
        ref = _vmap_grad_contributions(model, ids, labels, m)
        g = out["dy_proj"][li].double()[:, :, None] * out["x_proj"][li].double()[:, None, :]  # (T, d_out, d_in)
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=0)
        # per-layer dot / norm / alignment from the explicit contributions
        flat = ref.flatten(1)
        G = flat.sum(0)
        dot, norm = flat @ G, flat.norm(dim=1)
        _close(out["layer.dot"][li], dot, 1e-6)
        _close(out["layer.norm"][li], norm, 1e-6)
        _close(out["layer.G_norm"][li], G.norm(), 1e-6)
        # sum_t g_t is the ordinary weight gradient
        pname = decoder_param_names(model_parts(model), [m.weight])[0]
        torch.testing.assert_close(out["G"][pname].double(), G.view_as(m.weight), atol=1e-10, rtol=1e-8)


def test_per_position_aggregate_and_G_matches_per_token_loss(peft_model):
    """Over all layers: dots add, norms add in quadrature; ||G|| of the per-position trace (sum over positions) is
    the norm of the same gradient as G of the per-token-loss quantity (sum over token losses)."""
    ids, labels = sequence(T=17, prompt=5)
    pos = trace_per_position(peft_model, ids, labels)
    tok = per_token_loss_alignment(peft_model, ids, labels, norms="exact")
    _close(pos["G_norm"], tok["G_norm"], 1e-5)
    _close(pos["dot"], pos["layer.dot"].sum(0), 1e-6)
    _close(pos["norm"], pos["layer.norm"].square().sum(0).sqrt(), 1e-6)
    # sum_t <g_t, G> = ||G||^2 (the per-position contributions add up to G)
    assert abs(pos["dot"].double().sum().item() - pos["G_norm"].item() ** 2) < 1e-4 * pos["G_norm"].item() ** 2
    # the last position has no later loss, so no gradient: alignment NaN
    assert pos["norm"][-1] == 0 and torch.isnan(pos["alignment"][-1])


def test_identity_projection_is_exact_and_random_projection_follows_jl():
    """Identity projections reproduce the unprojected values exactly; Rademacher projections approximate the
    normalised inner products <g_s, g_t> / (||g_s|| ||g_t||) within the JL bound, and the error shrinks with k."""
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out = 48, 512, 384
    base = torch.randn(4, d_in, generator=g)  # correlated rows, so the alignments are far from 0
    x = torch.randn(T, 4, generator=g) @ base + 0.5 * torch.randn(T, d_in, generator=g)
    dy = torch.randn(T, d_out, generator=g) + 1.0
    exact = position_alignment(x, dy)
    mod = torch.nn.Linear(d_in, d_out, bias=False)
    ident = Projector.build({"l": mod}, factor=1)
    assert ident.kind == "identity"
    xp, dyp = ident.project("l", x, dy)
    for k, v in position_alignment(xp, dyp).items():
        assert torch.equal(v, exact[k])

    def gram(xx, yy):
        K = (yy.double() @ yy.double().T) * (xx.double() @ xx.double().T)
        n = K.diagonal().sqrt()
        return K / n[:, None] / n[None, :]

    K_exact = gram(x, dy)
    errs = []
    for k in (16, 64, 256):
        e_gram, e_align = [], []
        for seed in range(3):
            proj = Projector.build({"l": mod}, max_dim=k, seed=seed)
            assert proj.dims({"l": mod}) == {"l": [k, k]}
            xp, dyp = proj.project("l", x, dy)
            e_gram.append((gram(xp, dyp) - K_exact).abs().max().item())
            e_align.append((position_alignment(xp, dyp)["alignment"] - exact["alignment"]).abs().mean().item())
        # JL (Achlioptas 2003): each factor's normalised inner product is within eps = sqrt(8 ln(4 n^2 / delta) / k)
        # of the truth for all n^2 pairs with prob. >= 1 - delta; a product of two such factors within 2 eps + eps^2
        eps = math.sqrt(8 * math.log(4 * T**2 / 0.01) / k)
        assert max(e_gram) <= 2 * eps + eps**2
        errs.append(sum(e_align) / 3)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.5 * errs[0]


def test_rademacher_projector_is_deterministic_and_unit_columns():
    a = rademacher(8, 20, 123)
    assert torch.equal(a, rademacher(8, 20, 123)) and not torch.equal(a, rademacher(8, 20, 124))
    assert set(a.mul(math.sqrt(8)).round().unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(a.norm(dim=0), torch.ones(20))  # every column has norm 1 -> E[P^T P] = I
    mods = {"a": torch.nn.Linear(40, 10), "b": torch.nn.Linear(40, 10)}
    assert Projector.build(mods, factor=4).dims(mods) == {"a": [10, 3], "b": [10, 3]}  # ceil(d / 4) on both sides
    p1, p2 = Projector.build(mods, max_dim=10, seed=5), Projector.build(mods, max_dim=10, seed=5)
    assert p1.dims(mods) == {"a": [10, 10], "b": [10, 10]}
    assert p1.mats["a"][1] is None  # output side has d = 10 <= 10: identity
    assert torch.equal(p1.mats["a"][0], p2.mats["a"][0]) and not torch.equal(p1.mats["a"][0], p1.mats["b"][0])
    assert Projector.side_dim(576, factor=3, max_dim=64) == 64 and Projector.side_dim(32, factor=1) == 32


def test_aggregate_layers_closed_form():
    r1 = {"dot": torch.tensor([3.0, 0.0]), "norm": torch.tensor([3.0, 0.0]), "alignment": torch.tensor([0.5, math.nan]),
          "G_norm": torch.tensor(2.0)}
    r2 = {"dot": torch.tensor([1.0, 2.0]), "norm": torch.tensor([4.0, 1.0]), "alignment": torch.tensor([0.1, 1.0]),
          "G_norm": torch.tensor(1.0)}
    out = aggregate_layers([r1, r2])
    torch.testing.assert_close(out["dot"], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(out["norm"], torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(out["G_norm"], torch.tensor(math.sqrt(5.0)))
    torch.testing.assert_close(out["alignment"], torch.tensor([4 / (5 * math.sqrt(5)), 2 / math.sqrt(5)]))
    assert out["layer.dot"].shape == (2, 2) and out["layer.G_norm"].shape == (2,)


# --------------------------------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------------------------------
def test_token_stats_uniform_logits_closed_form():
    V, T = 16, 5
    labels = torch.tensor([3, -100, 4, 5, 6])
    s = token_stats(torch.zeros(T, V), labels)
    assert s["mask"].tolist() == [False, False, True, True, True]  # t = 0 is never a target
    torch.testing.assert_close(s["loss"][2:], torch.full((3,), math.log(V)))
    torch.testing.assert_close(s["p"][2:], torch.full((3,), 1 / V))
    torch.testing.assert_close(s["entropy"][2:], torch.full((3,), math.log(V)))
    assert (s["loss"][:2] == 0).all()


def test_token_stats_uses_previous_logits():
    V = 4
    logits = torch.full((3, V), -30.0)
    logits[0, 2] = 30.0  # position 0 predicts token 2 with p ~ 1
    s = token_stats(logits, torch.tensor([0, 2, 1]))
    assert s["p"][1] > 0.999 and s["p"][2] == pytest.approx(0.25, abs=1e-6)


def test_select_trace_modules(peft_model, full_model):
    lora = select_trace_modules(peft_model)
    assert len(lora) == 8 and all(".lora_A.default" in n or ".lora_B.default" in n for n in lora)
    qv = select_trace_modules(full_model)
    assert sorted(n.rsplit(".", 1)[1] for n in qv) == ["q_proj"] * 2 + ["v_proj"] * 2
    assert len(select_trace_modules(full_model, r"layers\.1\.mlp\.(up|down)_proj$")) == 2
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        select_trace_modules(full_model, "nothing_like_this")
    with pytest.raises(ValueError, match="outside the decoder"):
        select_trace_modules(full_model, "lm_head")


def test_split_forward_equals_model_logits(peft_model):
    ids, _ = sequence()
    parts = model_parts(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(parts.head(parts.hidden(ids[None])), peft_model(input_ids=ids[None]).logits)


def test_eager_attention_switches_and_restores():
    model = lora_model(0, attn="sdpa")
    base = model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert base.config._attn_implementation == "eager"
        ids, labels = sequence()
        per_token_loss_alignment(model, ids, labels, norms="projection", num_directions=2)
    assert base.config._attn_implementation == "sdpa"
