"""The fused LoRA linear (`tokensft.lora`) computes PEFT's LoRA layer: outputs and gradients equal PEFT's own path to
float32 rounding (the only difference: `dx = g W + dh A` accumulates inside one GEMM instead of autograd's separate
sum), on single layers and through a whole model and the trainer's step; PEFT's path still runs wherever the fused one
would differ (adapter off, dropout, autocast, hooks)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests.eval.conftest import make_tiny_llama

from tokensft.lora import FusedLoRALinear, fuse_lora

# float32 rounding through a 2-layer model: gradients agree to ~1e-7 of each tensor's largest entry; 1e-5 leaves room,
# and a real error (a missing scaling, a wrong transpose) is off by O(1)
SCALE_TOL = 1e-5


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
    assert err <= SCALE_TOL, (name, err)


@pytest.mark.parametrize("scaling, with_bias, exact", [(2.0, False, True), (0.75, True, False)])
def test_fused_linear_equals_the_naive_formula(scaling, with_bias, exact):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 12, dtype=torch.float64 if not exact else torch.float32, requires_grad=True)
    dt = x.dtype
    w, a, b = torch.randn(10, 12, dtype=dt), torch.randn(4, 12, dtype=dt), torch.randn(10, 4, dtype=dt)
    bias = torch.randn(10, dtype=dt) if with_bias else None
    a.requires_grad_(True)
    b.requires_grad_(True)
    g = torch.randn(3, 7, 10, dtype=dt)

    def grads(f):
        x.grad = a.grad = b.grad = None
        y = f()
        y.backward(g)
        return [y.detach().clone(), x.grad.clone(), a.grad.clone(), b.grad.clone()]

    naive = grads(lambda: (x @ w.t() + (0 if bias is None else bias)) + (x @ a.t()) @ b.t() * scaling)
    fused = grads(lambda: FusedLoRALinear.apply(x, w, bias, a, b, scaling))
    for n, f in zip(naive, fused):
        if exact:
            torch.testing.assert_close(f, n, rtol=2e-6, atol=2e-6)
        else:  # float64: the reordering changes nothing above rounding
            torch.testing.assert_close(f, n, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x_, a_, b_: FusedLoRALinear.apply(x_, w, bias, a_, b_, scaling),
                                    (x.detach().double().requires_grad_(), a.detach().double().requires_grad_(),
                                     b.detach().double().requires_grad_())) if not exact else True


def _lora_model(dropout=0.0, seed=0):
    model = make_tiny_llama(seed=seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    return model.train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_model_equals_peft():
    ids = torch.randint(3, 49152, (2, 17), generator=torch.Generator().manual_seed(1))
    model = _lora_model()
    loss0, g0 = _loss_and_grads(model, ids)
    assert fuse_lora(model) == 14 and fuse_lora(model) == 0  # 2 layers x 7 linears; idempotent
    calls = []
    orig = FusedLoRALinear.apply
    FusedLoRALinear.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        loss1, g1 = _loss_and_grads(model, ids)
    finally:
        FusedLoRALinear.apply = orig
    assert len(calls) == 14  # the fused path ran in every layer
    assert loss1 == pytest.approx(loss0, rel=1e-6) and g1.keys() == g0.keys()
    for n in g0:
        assert_close_to_scale(g1[n], g0[n], n)
    with torch.no_grad(), model.disable_adapter():  # the adapter-off reference is still the base model
        off = model(input_ids=ids).logits
        base = make_tiny_llama(seed=0)(input_ids=ids).logits
    torch.testing.assert_close(off, base, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["dropout", "autocast", "hook"])
def test_peft_path_runs_where_the_fused_one_would_differ(case):
    ids = torch.randint(3, 49152, (2, 9), generator=torch.Generator().manual_seed(2))
    model = _lora_model(dropout=0.1 if case == "dropout" else 0.0)
    fuse_lora(model)
    calls = []
    orig = FusedLoRALinear.apply
    FusedLoRALinear.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids)
        elif case == "hook":
            layer = model.base_model.model.model.layers[0].mlp.up_proj
            seen = []
            layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
            model(input_ids=ids)
            assert seen  # the tracer's kind of hook still fires
        else:
            model(input_ids=ids)
    finally:
        FusedLoRALinear.apply = orig
    assert len(calls) == (13 if case == "hook" else 0)


def test_trainer_step_uses_the_fused_layers(tmp_path):
    """The trainer's own training step (chunked head, sft): layers fused, and its gradients equal PEFT's path's."""
    from datasets import Dataset
    from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer

    from tokensft.data import CompletionCollator
    from tokensft.trainer.config import TokenSFTConfig
    from tokensft.trainer.trainer import TokenSFTTrainer

    rows = tiny_rows(2, seed=4)
    grads = []
    for fused in (True, False):
        model = tiny_model(3)
        cfg = TokenSFTConfig(output_dir=str(tmp_path / str(fused)), mode="sft", report_to="none", use_cpu=True,
                             per_device_train_batch_size=2, max_length=None, bf16=False,
                             dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                             disable_tqdm=True, gradient_checkpointing=False)
        tr = TokenSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
                             data_collator=CompletionCollator(2),
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        layers = [m for m in tr.model.modules() if hasattr(m, "_peft_forward")]
        assert len(layers) == 14
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        if not fused:
            for m in layers:
                m.forward = m._peft_forward
        tr.model.train()
        batch = CompletionCollator(2)(rows)
        tr.current_gradient_accumulation_steps = 1
        n_items = sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
        loss = tr.training_step(tr.model, dict(batch), num_items_in_batch=torch.tensor(float(n_items)))
        grads.append((float(loss), {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}))
    (l1, g1), (l0, g0) = grads
    assert l1 == pytest.approx(l0, rel=1e-6) and g1.keys() == g0.keys() and len(g0) == 28
    for n in g0:
        assert_close_to_scale(g1[n], g0[n], n)
