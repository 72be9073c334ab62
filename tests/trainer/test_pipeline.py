"""The path that trains is the path that is tested: `TokenSFTTrainer.compute_loss` equals the functional
`weighted_lm_loss` (value and gradient) for every registered mode, and logged statistics are token means over the
optimizer step (equal at GA=1 and GA=4)."""

from __future__ import annotations

import copy
import math

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


def _functional(tr, batch, trained, **kw):
    """`weighted_lm_loss` on full logits of the trainer's model (and its reference's, when it has one): the logits,
    the `LossOutput` and the gradient of its loss with respect to `trained`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = tr.model(**inputs).logits
    ref_logits = None
    if tr.ref_model is not None:
        with torch.no_grad():
            ref_logits = tr.ref_model(**inputs).logits
    out = weighted_lm_loss(logits, batch["labels"], mode=tr.scheme.name, ref_logits=ref_logits, **kw)
    return logits, out, torch.autograd.grad(out.loss, trained)


@pytest.mark.parametrize("head", ["fused", "chunked", "logits", "auto"])
@pytest.mark.parametrize("scope", ["micro_batch", "sequence"])
@pytest.mark.parametrize("mode", BUILTIN)
def test_trainer_loss_and_gradient_equal_weighted_lm_loss(tmp_path, mode, scope, head):
    """Every built-in mode on every `--loss_head`: the trainer's loss and gradient equal the functional reference, and
    for every mode but sft (weights all 1, no KL) they differ from plain CE: no head drops the weights."""
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
    entropy = tr._token_inputs(tr.model, batch).entropy  # (B, T-1), logged: the same on every head path
    trained = [p for p in tr.model.parameters() if p.requires_grad]
    g_trainer = torch.autograd.grad(loss, trained)

    # the functional path on full logits of the same model (no fused head, no chunked KL over hidden states)
    logits, out, g_functional = _functional(tr, batch, trained, stat_scope=scope, num_items_in_batch=n_items, **kw)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V)
    m = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(entropy[m], -(logp.exp() * logp).sum(-1)[m], rtol=1e-4, atol=1e-5)
    for a, b in zip(g_trainer, g_functional):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if mode in ("sft-topk", "sft-antiop", "sft-lr", "dft", "sft-pk", "rho1", "eaft"):
        assert 0 < float(out.weights[out.mask].mean()) < 1.5 and float(out.weights[out.mask].std()) > 0
    nll = -logp.detach().gather(-1, batch["labels"][:, 1:].clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
    plain = float(nll[m].sum()) / n_items  # plain CE over the step's targets
    if mode == "sft":
        assert float(loss.detach()) == pytest.approx(plain, rel=1e-5)
    else:  # weights not all 1 (or a KL term): never plain CE, by 10x the tolerance of the equality above
        assert abs(float(loss.detach()) - plain) > 10 * (1e-5 * plain + 1e-6), (mode, head)


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


@pytest.mark.parametrize("head", ["chunked", "logits", "fused"])
def test_logged_entropy_is_over_the_shifted_label_positions_only(tmp_path, head):
    """`entropy` in the logs is the mean of H(p_theta(. | y_<t)) over exactly the positions whose shifted label is
    supervised (`labels[:, 1:] != -100`): not the prompt, not padding, not the last position, nothing unshifted."""
    def peaked_model():  # a sharper LM head than random init, so the entropy varies from position to position
        m = tiny_model(0)
        with torch.no_grad():
            m.lm_head.weight.mul_(40.0)
        return m

    rows = tiny_rows(4, seed=5, min_len=6, max_len=14)
    batch = CompletionCollator(0)(rows)
    with torch.no_grad():  # the model before the step: the logged statistics come from the step's own forward
        logits = peaked_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), -1)
    h = -(logp.exp() * logp).sum(-1)  # (B, T) entropy of the prediction made at each position
    shifted = batch["labels"][:, 1:] != -100  # the prediction at t is scored against labels[t + 1]
    expected = float(h[:, :-1][shifted].mean())
    tr = make_trainer(tmp_path, peaked_model(), rows, bs=4, ga=1, mode="sft", loss_head=head)
    tr.train()
    logged = next(r for r in tr.state.log_history if "nll" in r)["entropy"]
    assert logged == pytest.approx(expected, rel=1e-5)
    # the wrong alignments give other numbers, so the test can tell them apart
    assert float(h[batch["labels"] != -100].mean()) != pytest.approx(expected, rel=1e-3)  # unshifted
    assert float(h[batch["attention_mask"].bool()].mean()) != pytest.approx(expected, rel=1e-3)  # every position


@pytest.mark.parametrize("mode,scope", [("sft", "micro_batch"), ("sft-antiop", "sequence")])
def test_data_weights_survive_padding_free_batching(tmp_path, mode, scope):
    """Per-token data weights (the `weights` column) go through `--padding_free true` packing: the trainer's loss
    and gradients equal the padded batch's, and for sft the loss is sum w_t l_t / n in closed form (not plain CE)."""
    rows = tiny_rows(4, seed=4)
    g = torch.Generator().manual_seed(1)
    for r in rows:
        lab = torch.tensor(r["labels"])
        r["weights"] = torch.where(lab != -100, 2 * torch.rand(len(lab), generator=g), 0.0).tolist()
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode=mode, stat_scope=scope)
    tr.model.train()
    n = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    trained = [p for p in tr.model.parameters() if p.requires_grad]
    results = []
    for padding_free in (False, True):
        batch = tr._prepare_inputs(CompletionCollator(0, padding_free=padding_free)(rows))
        loss = tr.compute_loss(tr.model, batch, num_items_in_batch=n)
        results.append((loss, torch.autograd.grad(loss, trained)))
    (loss_pad, g_pad), (loss_free, g_free) = results
    torch.testing.assert_close(loss_free, loss_pad, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_free, g_pad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if mode == "sft":
        expected, plain = 0.0, 0.0
        with torch.no_grad():
            for r in rows:
                logp = torch.log_softmax(tr.model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1], -1)
                tgt = torch.tensor(r["labels"][1:])
                ok = tgt != -100
                nll = -logp[ok].gather(-1, tgt[ok, None]).squeeze(-1)
                expected += float((torch.tensor(r["weights"][1:])[ok] * nll).sum())
                plain += float(nll.sum())
        assert float(loss_free) == pytest.approx(expected / n, rel=1e-5)
        assert float(loss_free) != pytest.approx(plain / n, rel=1e-2)  # the weights were not dropped


def _softcapped_model():
    """A tiny Gemma-2 (final_logit_softcapping = 2: logits = 2 tanh(z / 2), far from z at this init scale)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                       final_logit_softcapping=2.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits well beyond the cap, so ignoring it would change them
    return model


@pytest.mark.parametrize("head", ["auto", "fused", "logits"])
def test_weighted_loss_on_a_softcapped_model_is_exact_on_every_allowed_head(tmp_path, head):
    """The head paths must score the model's own logits: with `final_logit_softcapping`, `auto` takes plain logits on
    CPU (the chunked head does not cap), and every allowed head equals the functional loss on `model(...).logits`
    (the capped ones): a weighted mode never silently scores other log-probs or falls back to plain CE."""
    rows = tiny_rows(4, seed=3)
    tr = make_trainer(tmp_path, _softcapped_model(), rows, bs=4, ga=1, mode="sft-antiop", loss_head=head,
                      antiop_clip_mult=1.0)
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    tr.model.train()
    n = int((batch["labels"][:, 1:] != -100).sum())
    loss = tr.compute_loss(tr.model, batch, num_items_in_batch=n)
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float(logits.abs().max()) <= 2.0 + 1e-4  # the cap is on
    out = weighted_lm_loss(logits, batch["labels"], mode="sft-antiop", antiop_clip_mult=1.0, num_items_in_batch=n)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    plain = weighted_lm_loss(logits, batch["labels"], mode="sft", num_items_in_batch=n).loss
    assert abs(float(loss) - float(plain)) > 1e-3  # the weights count


def test_chunked_head_refuses_a_softcapped_model(tmp_path):
    """`--loss_head chunked` (and the modes that always take it: KL, top-K entropy) on a model whose logits are
    soft-capped: one clear error rather than log-probs of uncapped logits."""
    rows = tiny_rows(4, seed=3)
    for mode, head in (("sft-antiop", "chunked"), ("eaft", "auto")):
        tr = make_trainer(tmp_path, _softcapped_model(), rows, bs=4, ga=1, mode=mode, loss_head=head)
        batch = tr._prepare_inputs(CompletionCollator(0)(rows))
        with pytest.raises(ValueError, match="does not apply this model's final_logit_softcapping"):
            tr.compute_loss(tr.model, batch)


def test_fused_head_without_log_probs_is_an_error_not_plain_ce(tmp_path, monkeypatch):
    """If the fused call comes back as an ordinary output (TRL's head not attached), the trainer stops with a
    clear error; it never uses the model's own `loss` (plain CE)."""
    rows = tiny_rows(4, seed=3)
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode="dft", loss_head="fused")
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    model = tr.model
    plain_forward = type(model).forward.__get__(model)  # the unpatched forward: logits and CE `loss`
    monkeypatch.setattr(model, "forward", lambda *a, fused_lm_head=False, **kw: plain_forward(*a, **kw))
    with pytest.raises(RuntimeError, match="returned no per-token log-probs"):
        tr.compute_loss(model, batch)


def test_fused_reference_without_log_probs_is_an_error_not_plain_ce(tmp_path, monkeypatch):
    """The reference's fused call (rho1 reads ref log-probs through the policy's head path, here a frozen copy)
    without TRL's head: one clear error naming the reference, never its plain-CE `loss` or a crash in the scheme."""
    rows = tiny_rows(4, seed=3)
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode="rho1", loss_head="fused",
                      ref_model=_perturbed_reference(), ref_source="model")
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    ref = tr.ref_model  # only the reference loses its head; the policy keeps TRL's
    plain_forward = type(ref).forward.__get__(ref)
    monkeypatch.setattr(ref, "forward", lambda *a, fused_lm_head=False, **kw: plain_forward(*a, **kw))
    with pytest.raises(RuntimeError, match="--loss_head fused: the reference returned no per-token log-probs"):
        tr.compute_loss(tr.model, batch)


@pytest.mark.parametrize("head", ["fused", "chunked", "logits"])
def test_data_weights_reach_the_loss_on_every_head(tmp_path, head):
    """Per-token data weights on each `--loss_head`: sft's loss is sum w_t l_t / n in closed form (a naive per-token
    NLL of the same model), not plain CE sum l_t / n."""
    rows = tiny_rows(4, seed=6)
    g = torch.Generator().manual_seed(2)
    for r in rows:
        r["weights"] = [0.0 if lab == -100 else float(2 * torch.rand((), generator=g)) for lab in r["labels"]]
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode="sft", loss_head=head)
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    tr.model.train()
    n = int((batch["labels"][:, 1:] != -100).sum())
    loss = float(tr.compute_loss(tr.model, batch, num_items_in_batch=n).detach())
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = batch["labels"][:, 1:]
    ok = tgt != -100
    nll = -logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)[ok]
    assert loss == pytest.approx(float((batch["weights"][:, 1:][ok].double() * nll).sum()) / n, rel=1e-5)
    assert loss != pytest.approx(float(nll.sum()) / n, rel=1e-2)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_eaft_norm_choice_reaches_the_trained_loss(tmp_path, alpha):
    """`--eaft_norm ln_k` in the trainer: w = (H^(K) / ln K)^alpha instead of (H^(K) / 3)^alpha, so with the same
    top-K entropies the trained loss (sum w l / n) is exactly (3 / ln K)^alpha times the constant-norm loss."""
    rows = tiny_rows(4, seed=3)
    losses = {}
    for norm in ("constant", "ln_k"):
        tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode="eaft", entropy_top_k=5, eaft_alpha=alpha,
                          eaft_norm=norm)
        assert tr.scheme_params["eaft_norm"] == norm
        batch = tr._prepare_inputs(CompletionCollator(0)(rows))
        n = int((batch["labels"][:, 1:] != -100).sum())
        losses[norm] = float(tr.compute_loss(tr.model, batch, num_items_in_batch=n).detach())
    assert losses["ln_k"] == pytest.approx(losses["constant"] * (3.0 / math.log(5)) ** alpha, rel=1e-5)


@pytest.mark.parametrize("head", ["chunked", "logits", "fused"])
def test_logged_entropy_of_a_packed_batch_skips_the_sample_boundaries(tmp_path, head):
    """`--padding_free true`: the logged entropy is the mean over each sample's own shifted supervised positions,
    the same number as for the padded batch; the position that would predict the next sample's first token (a
    boundary of the packed row) and the tail padding are not in it."""
    rows = tiny_rows(4, seed=5, min_len=6, max_len=14)
    model = tiny_model(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # entropies that vary from position to position
    h_sum, n = 0.0, 0
    with torch.no_grad():  # naive: each sample alone, H at t scored against labels[t + 1]
        for r in rows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1].double(), -1)
            ok = torch.tensor(r["labels"][1:]) != -100
            h_sum += float(-(logp.exp() * logp).sum(-1)[ok].sum())
            n += int(ok.sum())
    tr = make_trainer(tmp_path, model, rows, bs=4, ga=1, mode="sft", loss_head=head)
    tr.model.train()
    batch = tr._prepare_inputs(CompletionCollator(0, padding_free=True, pad_to_multiple_of=64)(rows))
    with torch.no_grad():
        tr.compute_loss(tr.model, batch, num_items_in_batch=n)
    stats = tr._token_stats["train"].compute()
    assert stats["entropy"] == pytest.approx(h_sum / n, rel=1e-5)


def _every_head_need(ctx):
    # reads every need a path's head pass or reference produces: entropy, top-K entropy, reference log-probs
    return torch.sigmoid(ctx.entropy - ctx.topk_entropy + ctx.ref_log_probs - ctx.log_probs)


@pytest.mark.parametrize("head,needs", [
    ("fused", ("entropy",)), ("chunked", ("entropy",)), ("logits", ("entropy",)),
    ("chunked", ("entropy", "topk_entropy", "ref_log_probs", "ref_distribution")),  # the KL forces the chunked head
])
def test_a_user_scheme_gets_each_need_from_the_trainer_as_from_weighted_lm_loss(tmp_path, head, needs):
    """Each need has one producer per path: a user's scheme that reads the entropy (no built-in does) trains with the
    loss and gradient of the functional path on every head; one that reads every head and reference need at once,
    on the chunked head (the only one that computes the KL and the top-K entropy)."""
    from tokensft.losses import register_scheme

    def entropy_weight(ctx):
        return torch.exp(-ctx.entropy)

    fn = entropy_weight if needs == ("entropy",) else _every_head_need
    register_scheme("needs-test", fn, needs=needs)
    rows = tiny_rows(4, seed=3)
    ref = _perturbed_reference() if "ref_log_probs" in needs else None
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode="needs-test", ref_model=ref,
                      ref_source="model" if ref is not None else None, loss_head=head, entropy_top_k=4)
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    tr.model.train()
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = tr.compute_loss(tr.model, batch, num_items_in_batch=n_items)
    trained = [p for p in tr.model.parameters() if p.requires_grad]
    g_trainer = torch.autograd.grad(loss, trained)
    _, out, g_functional = _functional(tr, batch, trained, num_items_in_batch=n_items,
                                       **({"entropy_top_k": 4} if ref is not None else {}))
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_trainer, g_functional):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    w = out.weights[out.mask]
    assert 0 < float(w.min()) and float(w.max()) < 1 and float(w.std()) > 0  # the need reached the weights
