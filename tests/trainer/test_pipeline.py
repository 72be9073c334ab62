"""The path that trains is the path that is tested: `TokenSFTTrainer.compute_loss` equals the functional
`weighted_lm_loss` (value and gradient) for every registered mode, and logged statistics are token means over the
optimizer step (equal at GA=1 and GA=4)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import tiny_model, tiny_rows
from tests.trainer.test_trainer_invariance import make_trainer

from tokensft.data import CompletionCollator
from tokensft.losses import available_modes, get_scheme, weighted_lm_loss

BUILTIN = ["sft", "dft", "sft+kl", "asft", "sft-topk", "sft-antiop", "sft-lr", "sft-pk", "rho1", "eaft"]


def _perturbed_reference(seed: int = 0):
    ref = copy.deepcopy(tiny_model(seed))
    with torch.no_grad():  # a reference that differs from the policy, so weights and KL are not trivial
        g = torch.Generator().manual_seed(7)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref.eval()


@pytest.mark.parametrize("head", ["fused", "chunked", "logits"])
@pytest.mark.parametrize("scope", ["micro_batch", "sequence"])
@pytest.mark.parametrize("mode", BUILTIN)
def test_trainer_loss_and_gradient_equal_weighted_lm_loss(tmp_path, mode, scope, head):
    assert set(BUILTIN) <= set(available_modes())
    scheme = get_scheme(mode)
    rows = tiny_rows(4, seed=3)
    model = tiny_model(0)
    ref = _perturbed_reference() if (scheme.needs_reference or scheme.uses_kl) else None
    params = {"topk_keep_ratio": 0.6, "antiop_clip_mult": 1.0, "lr_weight_alpha": 2.0, "kl_weight": 0.3,
              "pk_power": 0.5, "rho1_keep_ratio": 0.5, "eaft_alpha": 3.0, "entropy_top_k": 5}
    kw = {k: v for k, v in params.items() if k in {p.name for p in scheme.params}}
    tr = make_trainer(tmp_path, model, rows, bs=4, ga=1, mode=mode, ref_model=ref, stat_scope=scope,
                      ref_source="model" if ref is not None else None, loss_head=head, **kw)
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    tr.model.train()
    n_items = int((batch["labels"][:, 1:] != -100).sum())  # what Trainer passes: the step's valid targets
    loss = tr.compute_loss(tr.model, batch, num_items_in_batch=n_items)
    entropy = tr._token_inputs(tr.model, batch)["entropy"]  # (B, T-1), logged: the same on every head path
    trained = [p for p in tr.model.parameters() if p.requires_grad]
    g_trainer = torch.autograd.grad(loss, trained)

    # the functional path on full logits of the same model (no fused head, no chunked KL over hidden states)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = tr.model(**inputs).logits
    ref_logits = None
    if ref is not None:
        with torch.no_grad():
            ref_logits = tr.ref_model(**inputs).logits
    out = weighted_lm_loss(logits, batch["labels"], mode=mode, ref_logits=ref_logits, stat_scope=scope,
                           num_items_in_batch=n_items, **kw)
    g_functional = torch.autograd.grad(out.loss, trained)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V)
    m = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(entropy[m], -(logp.exp() * logp).sum(-1)[m], rtol=1e-4, atol=1e-5)
    for a, b in zip(g_trainer, g_functional):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if mode in ("sft-topk", "sft-antiop", "sft-lr", "dft", "sft-pk", "rho1", "eaft"):
        assert 0 < float(out.weights[out.mask].mean()) < 1.5 and float(out.weights[out.mask].std()) > 0


def _logged(tmp_path, rows, *, bs, ga, mode, **kw):
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=bs, ga=ga, mode=mode, **kw)
    tr.train()
    return next(h for h in tr.state.log_history if "nll" in h)


@pytest.mark.parametrize("mode,scope", [("sft", "micro_batch"), ("sft-antiop", "global"), ("sft-topk", "global")])
def test_logged_statistics_are_token_means_over_the_step(tmp_path, mode, scope):
    # very different lengths: the mean of per-micro-batch means differs from the token mean
    rows = tiny_rows(4, seed=2, min_len=4, max_len=6) + tiny_rows(4, seed=3, min_len=40, max_len=48)
    l1 = _logged(tmp_path, rows, bs=8, ga=1, mode=mode, stat_scope=scope)
    l4 = _logged(tmp_path, rows, bs=2, ga=4, mode=mode, stat_scope=scope)
    for key in ("nll", "weight/mean", "weight/frac_reduced", "weight/frac_zero", "token_loss/median", "entropy"):
        assert l4[key] == pytest.approx(l1[key], rel=1e-5, abs=1e-7), key
    # and it is the plain token-mean NLL of the untouched model over all 8 rows
    model = tiny_model(0)
    batch = CompletionCollator(0)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = weighted_lm_loss(logits, batch["labels"], mode=mode)
    assert l1["nll"] == pytest.approx(out.stats["nll"], rel=1e-5)
    assert l1["token_loss/median"] == pytest.approx(out.stats["token_loss/median"], rel=1e-5)
    if mode != "sft":  # global scope over the whole step = the micro_batch scope of the whole batch
        assert l4["weight/mean"] == pytest.approx(out.stats["weight/mean"], rel=1e-5)


@pytest.mark.parametrize("mode", ["sft", "sft-antiop"])
def test_data_weights_multiply_into_the_trained_loss(tmp_path, mode):
    """A `weights` column (from the data) reaches the loss that trains: trainer == functional with the same data
    weights, and weight 2 on every token doubles the sft loss and its gradient (the normalisation counts tokens)."""
    rows = tiny_rows(4, seed=5)
    g = torch.Generator().manual_seed(0)
    for r in rows:
        r["weights"] = [0.0 if lab == -100 else float(torch.rand((), generator=g)) * 2 for lab in r["labels"]]
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode=mode)
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    assert "weights" in batch
    tr.model.train()
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = tr.compute_loss(tr.model, batch, num_items_in_batch=n_items)
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = weighted_lm_loss(logits, batch["labels"], mode=mode, num_items_in_batch=n_items,
                           data_weights=batch["weights"][:, 1:])
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    plain = weighted_lm_loss(logits, batch["labels"], mode=mode, num_items_in_batch=n_items)
    assert abs(float(out.loss) - float(plain.loss)) > 1e-3  # the weights changed the loss
    if mode == "sft":
        doubled = weighted_lm_loss(logits, batch["labels"], mode=mode, num_items_in_batch=n_items,
                                   data_weights=torch.full_like(batch["weights"][:, 1:], 2.0))
        torch.testing.assert_close(doubled.loss, 2 * plain.loss)


def test_auto_loss_head_is_the_chunked_head_on_cpu(tmp_path):
    """`--loss_head auto` takes the head measured fastest on CPU (benchmarks/bench_train_step_cpu.py)."""
    tr = make_trainer(tmp_path, tiny_model(0), tiny_rows(2, seed=1), bs=2, ga=1, mode="sft")
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert tr.args.loss_head == "auto" and tr.loss_head_path(mask) == "chunked"
    tr.args.loss_head = "logits"
    assert tr.loss_head_path(mask) == "logits"
