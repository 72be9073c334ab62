"""Reference model sources: adapter-off (with modules_to_save and gradient checkpointing), cache, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer
from transformers import TrainerCallback

from tokensft.data import CompletionCollator
from tokensft.losses import TokenInputs, shift_labels, token_weights
from tokensft.trainer.config import TokenSFTConfig
from tokensft.trainer.ref_cache import attach_ref_cache, build_ref_cache
from tokensft.trainer.trainer import TokenSFTTrainer


def lora_trainer(tmp_path, rows, *, mode, model=None, modules_to_save=None, gc=False, reentrant=True, callbacks=None,
                 **kw):
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(
        output_dir=str(tmp_path / f"lora-{mode}"), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
        logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0, mode=mode,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None, disable_tqdm=True,
        gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": reentrant} if gc else None, **kw,
    )
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    return TokenSFTTrainer(
        model=model or tiny_model(0), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
        data_collator=CompletionCollator(tok.pad_token_id), peft_config=peft, callbacks=callbacks,
    )


def base_log_probs(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    tgt = shift_labels(batch["labels"])
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0], tgt != -100


@pytest.mark.parametrize("mode", ["sft-lr", "sft+kl"])
def test_adapter_off_equals_base_model_after_a_step_with_modules_to_save(tmp_path, mode):
    rows = tiny_rows(4, seed=7)
    base = tiny_model(0)
    batch = CompletionCollator(0)(rows)
    before, mask = base_log_probs(copy.deepcopy(base), batch)
    tr = lora_trainer(tmp_path, rows, mode=mode, model=copy.deepcopy(base), modules_to_save=["lm_head"])
    tr.train()
    logs = next(h for h in tr.state.log_history if "nll" in h)
    if mode == "sft-lr":
        assert logs["weight/mean"] == 1.0  # p_ref == p_theta at step 0 -> w = 1 exactly
    else:
        assert logs["kl"] == 0.0  # KL(p_ref || p_theta) = 0 at step 0
    peft_model = tr.model
    lm_trained = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    assert not torch.equal(lm_trained, base.lm_head.weight)  # the trained copy moved ...
    with peft_model.disable_adapter():
        after, _ = base_log_probs(peft_model, batch)
    assert torch.equal(after[mask], before[mask])  # ... and the reference did not drift, exactly
    policy, _ = base_log_probs(peft_model, batch)
    assert not torch.allclose(policy[mask], before[mask])


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_every_lora_b(tmp_path, reentrant):
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    grads[n] = None if p.grad is None else p.grad.detach().clone()

    rows = tiny_rows(4, seed=8)
    tr = lora_trainer(tmp_path, rows, mode="sft-lr", gc=True, reentrant=reentrant, callbacks=[Grab()])
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" in n}
    tr.train()
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), "a lora_B got no gradient"
    after = dict(tr.model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)


def test_cache_equals_adapter_off_online_reference_and_refuses_mismatches(tmp_path):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "tiny"
    tiny_model(0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = tiny_rows(6, seed=9)
    ds = Dataset.from_list(rows)
    cache = tmp_path / "cache"
    build_ref_cache(ds, cache, model=str(model_dir), tokenizer=tok, template="plain", max_length=64, progress=False)
    cached = attach_ref_cache(ds, cache, model=str(model_dir), tokenizer=tok, template="plain", max_length=64)
    batch = CompletionCollator(tok.pad_token_id)(list(cached))
    # online: the LoRA policy with its adapter off (B = 0 at init, so the policy also equals the base)
    tr = lora_trainer(tmp_path, rows, mode="sft-lr", model=tiny_model(0))
    tr.model.eval()
    inputs = {k: v for k, v in batch.items() if k != "ref_log_probs"}
    mask = shift_labels(batch["labels"]) != -100
    with torch.no_grad():
        online = tr._reference_log_probs(tr.model, inputs, mask, "fused")
        policy = tr.model(**inputs, fused_lm_head=True).log_probs.float()
    cached_lp = batch["ref_log_probs"][:, 1:]
    torch.testing.assert_close(cached_lp[mask], online[mask], rtol=0, atol=1e-6)
    w_cache = token_weights("sft-lr", TokenInputs(policy, mask, ref_log_probs=cached_lp))
    w_online = token_weights("sft-lr", TokenInputs(policy, mask, ref_log_probs=online))
    torch.testing.assert_close(w_cache, w_online, rtol=0, atol=1e-6)
    # a cache built for another max length / tokenizer / data is refused, naming the field
    with pytest.raises(ValueError, match="max_length"):
        attach_ref_cache(ds, cache, model=str(model_dir), tokenizer=tok, template="plain", max_length=128)
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["extra"])
    with pytest.raises(ValueError, match="tokenizer"):
        attach_ref_cache(ds, cache, model=str(model_dir), tokenizer=other_tok, template="plain", max_length=64)
    with pytest.raises(ValueError, match="data"):
        attach_ref_cache(Dataset.from_list(tiny_rows(6, seed=10)), cache, model=str(model_dir), tokenizer=tok,
                         template="plain", max_length=64)


def test_adapter_source_refused_without_lora(tmp_path):
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(output_dir=str(tmp_path / "x"), mode="sft-lr", ref_source="adapter", report_to="none",
                         use_cpu=True, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    with pytest.raises(ValueError, match="use_peft"):
        TokenSFTTrainer(model=tiny_model(0), args=cfg, train_dataset=Dataset.from_list(tiny_rows(2)),
                        processing_class=tok, data_collator=CompletionCollator(0))
    cfg2 = TokenSFTConfig(output_dir=str(tmp_path / "y"), mode="asft", ref_source="cache", report_to="none",
                          use_cpu=True, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    with pytest.raises(ValueError, match="full distribution"):
        TokenSFTTrainer(model=tiny_model(0), args=cfg2, train_dataset=Dataset.from_list(tiny_rows(2)),
                        processing_class=tok, data_collator=CompletionCollator(0))


def test_adapter_reference_refused_when_switching_the_adapter_off_does_not_give_the_base_model(tmp_path):
    """Issue 31, item 5: LoRA bias="all" trains the base model's biases in place, so the adapter-off reference
    carried them (logits up to 0.58 off the base model, with only PEFT's generic warning)."""
    from peft import get_peft_model

    from tokensft.io import InputError
    from tokensft.trainer.reference import adapter_reference_problem

    tok = tiny_tokenizer()

    def build(model, peft=None, ref_model=None, **kw):
        cfg = TokenSFTConfig(output_dir=str(tmp_path / "x"), mode="sft-lr", report_to="none", use_cpu=True,
                             dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, **kw)
        return TokenSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(tiny_rows(2)),
                               processing_class=tok, data_collator=CompletionCollator(0), peft_config=peft,
                               ref_model=ref_model)

    for bias in ("all", "lora_only"):
        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, task_type="CAUSAL_LM")
        with pytest.raises(InputError, match=rf"bias='{bias}': it trains the base model's biases in place.*"
                                             "--ref_source model"):
            build(tiny_model(0), peft)
        build(tiny_model(0), peft, ref_model=tiny_model(0), ref_source="model")  # a frozen copy is the base model whatever the adapter does
    unfrozen = get_peft_model(tiny_model(0), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    unfrozen.base_model.model.model.embed_tokens.weight.requires_grad_(True)  # unfrozen by hand
    assert "model.embed_tokens.weight" in adapter_reference_problem(unfrozen)
    with pytest.raises(InputError, match="outside the adapter are trainable"):
        build(unfrozen)
    ok = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    assert adapter_reference_problem(get_peft_model(tiny_model(0), ok)) is None


def test_a_reference_pass_leaves_the_adapters_trainable_flags_and_the_optimizer_alone(tmp_path):
    """PEFT issue 3447: leaving `disable_adapter()` sets requires_grad=True on every adapter weight, also on ones the
    user froze (here LoRA-FA style: lora_A frozen, lora_B trained). After training sft-lr (a reference pass per
    micro-batch) the frozen weights are still frozen, unchanged and without gradients."""
    from peft import get_peft_model

    from tokensft.trainer.reference import adapter_disabled

    model = get_peft_model(tiny_model(0), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    with model.disable_adapter():
        pass
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)  # PEFT's behaviour ...
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapter_disabled(model):
        pass
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # ... undone by ours
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(output_dir=str(tmp_path / "fa"), per_device_train_batch_size=4, max_steps=2,
                         learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
                         mode="sft-lr", dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                         max_length=None, disable_tqdm=True)
    tr = TokenSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(tiny_rows(8, seed=3)),
                         processing_class=tok, data_collator=CompletionCollator(tok.pad_token_id))
    tr.train()
    named = dict(tr.model.named_parameters())
    assert {n: p.requires_grad for n, p in named.items() if n in flags} == flags
    assert all(torch.equal(named[n], a) and named[n].grad is None for n, a in a_before.items())
    in_optimizer = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in named.values() if p.requires_grad}
