"""Reference model for `sft-lr`, `sft+kl` and `asft`: the LoRA adapter switched off, a frozen copy, or a cache.

- `adapter` (LoRA runs): the policy with its adapter disabled (`PeftModel.disable_adapter`), under `torch.no_grad()`,
  through the policy's own LM-head path (`--loss_head`), so at step 0 its log-probs equal the policy's bit for bit.
  Modules in `modules_to_save` then come from their original copy, so the reference is the starting model and never
  drifts. Refused (loudly) when the unwrapped model is not a
  `PeftModel`, or is FSDP-wrapped, where the adapter cannot be switched off reliably.
- `model` (full fine-tuning): a separate frozen copy, dropout off, sharded like the policy under FSDP / DeepSpeed
  ZeRO-3 the way TRL's own trainers prepare their references (`prepare_reference_model`).
- `cache`: precomputed reference log-probs of every target token, read from the batch (`ref_log_probs` column).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / DeepSpeed engine / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and (isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
                                         or type(model).__name__ == "DeepSpeedEngine"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap(model), PeftModel)


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """True for FSDP1 wrappers or FSDP2 (`fully_shard`) modules."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()
    if isinstance(model, FullyShardedDataParallel):
        return True
    return any(type(m).__name__.startswith("FSDP") for m in [model, unwrap(model)])


@contextmanager
def adapter_disabled(model: nn.Module):
    """Run the policy as its own reference: LoRA adapter off, no gradient, dropout state untouched.

    Raises:
        RuntimeError: the model has no PEFT adapter, or is FSDP-wrapped (the adapter cannot be switched off there):
            use `ref_source=model` or `ref_source=cache` instead. Never falls back to the policy silently.
    """
    if is_fsdp_wrapped(model):
        raise RuntimeError(
            "ref_source=adapter cannot switch the LoRA adapter off on an FSDP-wrapped model; "
            "use ref_source=model (a frozen, sharded copy) or ref_source=cache."
        )
    peft_model = unwrap(model)
    if not is_peft_model(peft_model):
        raise RuntimeError(
            "ref_source=adapter needs a LoRA model (--use_peft); for full fine-tuning use ref_source=model or cache."
        )
    # PEFT re-enables adapter layers on exit with requires_grad=True, also on an adapter loaded for inference (PEFT
    # issue 3447): the flags are put back as they were, so the optimizer's parameter set never changes
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield
    finally:
        for p, was in flags:
            if p.requires_grad != was:
                p.requires_grad_(was)


ADAPTER_PARAM_MARKERS = ("modules_to_save", "trainable_tokens", "original_module")


def adapter_reference_problem(model: nn.Module) -> str | None:
    """Why switching the adapter off would not give back the starting model (`ref_source=adapter`), or None.

    It would not when the adapter trains weights of the base model in place: LoRA `bias="all"` / `"lora_only"` (the
    biases of the base layers are trained and stay trained with the adapter off), or any other trainable parameter
    outside the adapter (`lora_*`, `modules_to_save`, trainable tokens), e.g. one unfrozen by hand.

    Returns:
        One sentence naming the setting or the first such parameters, or None when the reference is the base model.
    """
    peft_model = unwrap(model)
    if not is_peft_model(peft_model):
        return None
    prefix = getattr(peft_model.base_model, "prefix", "lora_")
    for name, cfg in peft_model.peft_config.items():
        bias = getattr(cfg, "bias", "none")
        if bias not in (None, "none"):
            return (f"adapter {name!r} has bias={bias!r}: it trains the base model's biases in place, so with the "
                    "adapter off the reference still carries them")
    base_trained = [n for n, p in peft_model.named_parameters()
                    if p.requires_grad and prefix not in n and not any(m in n for m in ADAPTER_PARAM_MARKERS)]
    if base_trained:
        shown = ", ".join(base_trained[:3]) + (f" and {len(base_trained) - 3} more" if len(base_trained) > 3 else "")
        return f"base-model parameters outside the adapter are trainable ({shown}), so the adapter-off model drifts"
    return None


def resolved_ref_source(ref_source: str | None, scheme, use_peft: bool) -> str | None:
    """The reference a run uses: None when `scheme` reads none (no `ref_log_probs` need, no KL); else `ref_source`,
    or by default `adapter` with LoRA and `model` without (README, "Reference model")."""
    if not (scheme.needs_reference or scheme.uses_kl):
        return None
    return ref_source or ("adapter" if use_peft else "model")


def output_head_weights(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """LM head `(weight, bias)` of the policy and of the adapter-off reference.

    With `modules_to_save=["lm_head"]` the policy uses the trained copy and the reference the original one. A LoRA
    layer on the LM head itself is refused (KL modes need the head as one matrix).

    Returns:
        `(policy_weight (V, H), policy_bias, ref_weight (V, H), ref_bias)`.

    Raises:
        NotImplementedError: LoRA on the LM head.
    """
    base = unwrap(model)
    if is_peft_model(base):
        base = base.get_base_model()
    head = base.get_output_embeddings()
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        active = head.active_adapter if isinstance(head.active_adapter, str) else head.active_adapter[0]
        pol = head.modules_to_save[active]
        ref = head.original_module
        found = pol.weight, getattr(pol, "bias", None), ref.weight, getattr(ref, "bias", None)
    elif hasattr(head, "lora_A"):
        raise NotImplementedError(
            "KL modes need the LM head as one matrix; LoRA on lm_head is not supported there. "
            "Train it in full with --lora_modules_to_save lm_head instead."
        )
    else:
        found = head.weight, getattr(head, "bias", None), head.weight, getattr(head, "bias", None)
    return tuple(_gathered(t) for t in found)


def _gathered(t: torch.Tensor | None) -> torch.Tensor | None:
    """A head weight as one full tensor. Under FSDP2 the frozen reference's root is resharded after its forward, so
    its head is a `DTensor` shard outside that forward: gathered here (no gradient flows to it). The policy's root
    stays unsharded after its forward (FSDP2's default for the root), so its head is a plain tensor here.

    Raises:
        RuntimeError: a sharded head that needs a gradient (the policy's root resharded after forward).
    """
    if t is None or type(t).__name__ != "DTensor":
        return t
    if t.requires_grad:
        raise RuntimeError("the LM head is still sharded (FSDP2 resharded the policy's root after its forward); "
                           "leave fsdp_config reshard_after_forward at its default for the root module")
    return t.full_tensor()


def add_hidden_states_forward(model: nn.Module) -> None:
    """Patch `model.forward` so that `model(..., return_last_hidden=True)` returns the backbone's last hidden states.

    Goes through the full wrapper stack (DDP, PEFT), so gradient synchronisation and adapters behave as in a normal
    forward; the `(B, T, V)` logits are never built. Apply to the unwrapped `PreTrainedModel` (under PEFT:
    `get_base_model()`). Idempotent.
    """
    if getattr(model, "_tokensft_hidden_patch", False):
        return
    original_forward = model.forward

    def forward(*args, return_last_hidden: bool = False, **kwargs):
        if not return_last_hidden:
            return original_forward(*args, **kwargs)
        for k in ("labels", "fused_lm_head", "num_items_in_batch", "shift_labels"):
            kwargs.pop(k, None)
        kwargs["use_cache"] = False
        return model.base_model(*args, **kwargs).last_hidden_state  # backbone via base_model_prefix

    model.forward = forward
    model._tokensft_hidden_patch = True


def prepare_reference_model(ref_model: nn.Module, accelerator) -> nn.Module:
    """Freeze a reference copy (eval mode, no grad) and shard it like the policy, the way TRL's own trainers (DPO,
    KTO, GRPO) prepare theirs.

    Under FSDP (1 or 2) `trl.models.utils.prepare_fsdp` wraps it with the accelerator's FSDP plugin, under DeepSpeed
    `prepare_deepspeed` gives it a ZeRO-3 inference engine: its parameters are sharded across ranks instead of a full
    copy on every device (a 7B bf16 reference is 15.2 GB per GPU otherwise: the reference study's OOM on one 80 GB
    H100). Otherwise (one device, DDP) `accelerator.prepare_model(..., evaluation_mode=True)` places it. accelerate's
    own `prepare_model(evaluation_mode=True)` never shards a model, which is why it is not used under FSDP.

    Returns:
        The prepared reference (an FSDP module, a DeepSpeed engine or the placed model).
    """
    from accelerate.utils import DistributedType

    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.FSDP:
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(ref_model, accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(ref_model, accelerator)
    return accelerator.prepare_model(ref_model, evaluation_mode=True)
