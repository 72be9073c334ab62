"""`TokenSFTTrainer` end to end on a tiny model: gradient-accumulation invariance and the logged loss."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer

from tokensft.data import CompletionCollator
from tokensft.losses import get_scheme
from tokensft.trainer.config import TokenSFTConfig
from tokensft.trainer.trainer import TokenSFTTrainer


def make_trainer(tmp_path, model, rows, *, bs, ga, mode="sft", ref_model=None, max_steps=1, lr=1.0, **cfg_kwargs):
    cfg_kwargs.setdefault("bf16", False)  # exact fp32 comparisons; bf16 on a bf16-native CPU is tested on its own
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(
        output_dir=str(tmp_path / f"out-{bs}x{ga}-{mode}"), per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga, max_steps=max_steps, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=0, data_seed=0, dataloader_drop_last=False, mode=mode,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        disable_tqdm=True, **cfg_kwargs,
    )
    return TokenSFTTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
        data_collator=CompletionCollator(tok.pad_token_id), ref_model=ref_model,
    )


def step_params(tmp_path, rows, *, bs, ga, mode, **kw):
    model = tiny_model(0)
    scheme = get_scheme(mode)
    ref = copy.deepcopy(tiny_model(0)) if (scheme.needs_reference or scheme.uses_kl) else None
    if ref is not None:
        with torch.no_grad():  # a reference that differs from the policy, so weights and KL are not trivial
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
    tr = make_trainer(tmp_path, model, rows, bs=bs, ga=ga, mode=mode, ref_model=ref,
                      ref_source="model" if ref is not None else None, **kw)
    tr.train()
    loss = next(h["loss"] for h in tr.state.log_history if "loss" in h)
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}, loss


@pytest.mark.parametrize(
    "mode,scope",
    [("sft", "micro_batch"), ("dft", "micro_batch"), ("sft-lr", "micro_batch"), ("sft+kl", "micro_batch"),
     ("asft", "micro_batch"), ("sft-topk", "global"), ("sft-antiop", "global"), ("sft-antiop", "sequence"),
     ("sft-topk", "sequence"), ("rho1", "global"), ("eaft", "micro_batch"), ("sft-pk", "micro_batch")],
)
def test_batch8_ga1_equals_batch2_ga4(tmp_path, mode, scope):
    rows = tiny_rows(8, seed=1)
    kw = {"pk_power": 0.5} if mode == "sft-pk" else {}  # p ~ 1/64 on a random model: p^10 would not move it
    p1, l1 = step_params(tmp_path, rows, bs=8, ga=1, mode=mode, stat_scope=scope, **kw)
    p4, l4 = step_params(tmp_path, rows, bs=2, ga=4, mode=mode, stat_scope=scope, **kw)
    changed = 0
    for n in p1:
        torch.testing.assert_close(p4[n], p1[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        changed += int(not torch.equal(p1[n], tiny_model(0).state_dict()[n]))
    assert changed > 0  # the step did something
    assert l4 == pytest.approx(l1, rel=1e-4)


def test_micro_batch_scope_depends_on_the_split(tmp_path):
    """The reference study's micro_batch scope is *not* split-invariant (which is why `global` exists)."""
    rows = tiny_rows(8, seed=1)
    p1, _ = step_params(tmp_path, rows, bs=8, ga=1, mode="sft-topk", stat_scope="micro_batch")
    p4, _ = step_params(tmp_path, rows, bs=2, ga=4, mode="sft-topk", stat_scope="micro_batch")
    assert any(not torch.allclose(p1[n], p4[n], rtol=1e-5, atol=1e-6) for n in p1)


def test_logged_loss_is_token_mean_over_the_step_not_mean_of_means(tmp_path):
    # very different lengths so that the mean of per-micro-batch means differs from the token mean
    rows = tiny_rows(3, seed=2, min_len=4, max_len=5) + tiny_rows(3, seed=3, min_len=40, max_len=48)
    model = tiny_model(0)
    collate = CompletionCollator(0)
    with torch.no_grad():
        batch = collate(rows)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tgt = batch["labels"][:, 1:]
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        m = tgt != -100
        token_mean = float(-(lp * m).sum() / m.sum())
        per_row = [float(-(lp[i] * m[i]).sum() / m[i].sum()) for i in range(6)]
    _, l1 = step_params(tmp_path, rows, bs=6, ga=1, mode="sft")
    _, l2 = step_params(tmp_path, rows, bs=3, ga=2, mode="sft")
    assert l1 == pytest.approx(token_mean, abs=2e-4)
    assert l2 == pytest.approx(token_mean, abs=2e-4)
    mean_of_means = (sum(per_row[:3]) / 3 + sum(per_row[3:]) / 3) / 2
    assert abs(mean_of_means - token_mean) > 1e-3  # the test would catch the GA bug


def test_nll_and_weight_stats_are_logged(tmp_path):
    rows = tiny_rows(4, seed=5)
    tr = make_trainer(tmp_path, tiny_model(0), rows, bs=4, ga=1, mode="sft-antiop")
    tr.train()
    logs = next(h for h in tr.state.log_history if "nll" in h)
    for key in ("nll", "weight/mean", "weight/frac_reduced", "weight/frac_zero", "token_loss/median", "entropy"):
        assert key in logs
    assert logs["nll"] == pytest.approx(logs["loss"], abs=1e-3) or logs["weight/frac_reduced"] > 0
    assert 0 < logs["weight/mean"] <= 1
