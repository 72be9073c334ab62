"""`TokenSFTTrainer`: TRL's `SFTTrainer` with one `compute_loss` override for token-weighted losses.

`compute_loss` only gathers the per-token inputs of the loss into one `TokenInputs` bundle (`_token_inputs`: one
producer per need of the scheme, `tokensft.losses.NEEDS`) and hands it to the one pipeline,
`tokensft.losses.loss_from_log_probs` (weights -> reduced loss -> statistics):
- per-token log-probs and entropy from one LM-head path (`--loss_head`; `auto` = our chunked head on CPU, TRL's
  fused head on CUDA): `chunked` scores the supervised positions' hidden states in token chunks
  (`tokensft.losses.chunked_softmax_stats`, also the only path for the KL and top-K-entropy schemes), `fused` is
  `model(**inputs, fused_lm_head=True)`, `logits` builds `(B, T, V)` logits; no path but `logits` builds them;
- reference log-probs (adapter off / frozen model / cache) for schemes that declare `ref_log_probs`, through the
  policy's own head path, so that at step 0 of a LoRA run the excess loss l_theta - l_ref is exactly 0;
- for `stat_scope=global` and any scheme that declares a scope statistic, the scope values of every micro-batch of
  the optimizer step on every rank (`get_batch_samples`).
Logged statistics are token sums over every micro-batch of the logging window and every rank (`StepTokenStats`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from trl import SFTTrainer

from ..io import InputError
from ..lora import fuse_lora
from ..losses import (
    IGNORE_INDEX,
    NEEDS,
    PREMISE_DETECTORS,
    PREMISE_NEED,
    Reduction,
    StepTokenStats,
    TokenInputs,
    chunked_softmax_stats,
    get_scheme,
    head_options,
    loss_from_log_probs,
    premise_counts,
    premise_metrics,
    produce_needs,
    scope_values_of,
    segment_ids_from_position_ids,
    shift_labels,
)
from ..runtime import retain_freed_memory
from .reference import (
    adapter_disabled,
    adapter_reference_problem,
    add_hidden_states_forward,
    is_peft_model,
    output_head_weights,
    prepare_reference_model,
    resolved_ref_source,
    unwrap,
)

REF_LOG_PROBS_KEY = "ref_log_probs"
DATA_WEIGHTS_KEY = "weights"  # per-token data weights (`build_sft_dataset`), multiplied into the scheme's weights


logger = logging.getLogger("tokensft.train")


def _on_mask(mask: torch.Tensor, values: dict) -> dict:
    """Each `(n_valid,)` value placed on the True entries of `mask` `(B, T-1)`, float32 and 0 elsewhere (None stays
    None); differentiable in the values."""
    full = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return {k: None if v is None else full.masked_scatter(mask, v) for k, v in values.items()}
# PEFT (<= 0.21) and TRL (<= 1.16) still read `model.is_gradient_checkpointing`, which transformers 5.x deprecates
# with a FutureWarning on every run; the value they read is right, only the name is old
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# Config fields of models whose logits are not `hidden @ W^T + b`: TRL's fused head applies them, our chunked head
# does not, so a run on such a model must not take the chunked head (it would score other log-probs without a word)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def logit_transform(config) -> str | None:
    """The name of the first logit transform in `LOGIT_TRANSFORMS` that `config` (its text config) sets to anything
    but the identity (None / 1.0), else None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_TRANSFORMS:
        v = getattr(text, name, None)
        if v is not None and not (isinstance(v, (int, float)) and float(v) == 1.0):
            return name
    return None


class TokenSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose loss is `tokensft.losses` with `args.mode` (a `TokenSFTConfig`).

    Args:
        ref_model: optional frozen reference for `ref_source="model"` (a `PreTrainedModel`); loaded from
            `args.ref_model_name_or_path` when None and needed.
        Everything else: as `trl.SFTTrainer`.

    Raises:
        ValueError: a mode needs a reference that the configuration cannot provide.
    """

    def __init__(self, *args, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        if cfg.flush_denormal:
            torch.set_flush_denormal(True)  # process-wide; returns False where the CPU does not support it
        self.scheme = get_scheme(cfg.mode)
        self.scheme_params = cfg.scheme_params()
        # We scale for gradient accumulation ourselves (see `compute_loss`), so the logged loss is never rescaled
        self.loss_is_scaled_for_ga = True
        self.ref_model = None
        self.ref_source = resolved_ref_source(cfg.ref_source, self.scheme, is_peft_model(self.model))
        if self.ref_source is not None:
            if self.ref_source == "cache" and self.scheme.uses_kl:
                raise ValueError(
                    f"mode {cfg.mode!r} needs the reference's full distribution (KL); the cache holds only target "
                    "log-probs. Use ref_source=adapter (LoRA) or ref_source=model."
                )
            if self.ref_source == "adapter" and not is_peft_model(self.model):
                raise InputError("ref_source=adapter needs --use_peft; use ref_source=model or cache.")
            if self.ref_source == "adapter" and self.is_fsdp_enabled:
                raise InputError("ref_source=adapter cannot switch the LoRA adapter off on an FSDP-sharded model; use "
                                 "--ref_source model (a frozen copy, sharded like the policy) or --ref_source cache")
            if self.ref_source == "adapter" and (problem := adapter_reference_problem(self.model)):
                raise InputError(f"ref_source=adapter: the reference would not be the base model: {problem}; use "
                                 "bias='none' (the default), or --ref_source model (a frozen copy) or cache")
            if self.ref_source == "model":
                if ref_model is None:
                    from transformers import AutoModelForCausalLM

                    from ..models import resolve_model

                    name = cfg.ref_model_name_or_path or unwrap(self.model).config._name_or_path
                    ref_model = AutoModelForCausalLM.from_pretrained(
                        resolve_model(name), dtype=next(self.model.parameters()).dtype
                    )
                from trl.trainer.utils import add_fused_lm_head

                add_fused_lm_head(ref_model, outputs=("log_probs",))
                add_hidden_states_forward(ref_model)
                self.ref_model = prepare_reference_model(ref_model, self.accelerator)
            cfg.ref_source = self.ref_source  # the saved configuration records the reference actually used
            logger.info("mode %s: reference model = %s", cfg.mode, {
                "adapter": "the starting model with the LoRA adapter switched off (ref_source=adapter)",
                "model": f"a frozen copy of {cfg.ref_model_name_or_path or unwrap(self.model).config._name_or_path} "
                         f"({sum(p.numel() for p in (ref_model or unwrap(self.model)).parameters()) / 1e6:.0f}M "
                         "parameters, ref_source=model" + ("; with --use_peft the adapter-off base costs no second "
                                                          "copy" if not is_peft_model(self.model) else "") + ")",
                "cache": f"the precomputed cache {cfg.ref_cache_dir} (ref_source=cache)"}[self.ref_source])
        self._refuse_under_ranks(cfg)
        if head_options(self.scheme.needs, self.scheme_params) or cfg.loss_head in ("chunked", "auto"):
            base = unwrap(self.model)
            add_hidden_states_forward(base.get_base_model() if is_peft_model(base) else base)
        if self.args.device.type == "cpu":
            retain_freed_memory()  # activation-sized temporaries reused, not re-mmapped each step (runtime)
        if is_peft_model(unwrap(self.model)):
            # LoRA's scaling folded into the GEMMs (tokensft.lora): the same math with three fewer passes over each
            # layer's output; PEFT's own forward wherever the fused one does not apply (autocast, hooks, dropout, ...)
            fuse_lora(unwrap(self.model))
        self._logit_transform = logit_transform(unwrap(self.model).config)  # fixed for the run: read once
        self._scope_values = None
        self._token_stats = {"train": StepTokenStats(), "eval": StepTokenStats()}
        self._premise: dict[str, torch.Tensor] = {}  # summed `premise_counts` since the last log
        # the run's parameters of the premise detectors' schemes (their flags; declared defaults otherwise)
        self._premise_params = {p.name: getattr(cfg, p.name, p.default)
                                for mode in PREMISE_DETECTORS.values() for p in get_scheme(mode).params}

    def _refuse_under_ranks(self, cfg) -> None:
        """Refuse, before training starts, what does not run correctly on several ranks (docs/scale.md): the
        per-token gradient alignment of `--log_premise` and of schemes that need it (`sft-align`) is one process's
        micro-batch gradient, and tracing needs whole parameters on rank 0 (under DDP it runs there; under FSDP /
        ZeRO-3 the parameters are sharded).

        Raises:
            InputError: one line naming the option and what to do instead.
        """
        ranks = self.accelerator.num_processes
        if ranks > 1 and cfg.log_premise:
            raise InputError(f"--log_premise runs in one process (its per-token gradient alignment is one process's "
                             f"micro-batch gradient); this run has {ranks}: drop --log_premise or train on one")
        if ranks > 1 and "token_alignment" in self.scheme.needs:
            raise InputError(f"--mode {cfg.mode} needs each token's gradient alignment, computed in one process; this "
                             f"run has {ranks}: train it in one process")
        zero3 = self._zero3
        if (self.is_fsdp_enabled or zero3) and getattr(cfg, "trace_every_n_steps", 0):
            raise InputError("--trace_every_n_steps: tracing needs whole parameters on rank 0, and FSDP / ZeRO-3 "
                             "shard them; trace a DDP or one-process run")
        explicit = cfg.loss_head in ("chunked", "fused")  # both read the head's weight outside its forward
        if zero3 and (explicit or head_options(self.scheme.needs, self.scheme_params)):
            why = f"--loss_head {cfg.loss_head}" if explicit else f"--mode {cfg.mode} needs the chunked LM head"
            raise InputError(f"{why}, which reads the LM head's weight outside the head's forward, where ZeRO-3 "
                             "keeps it partitioned; use --loss_head logits (the default under ZeRO-3) with another "
                             "mode, or train this one under FSDP2 or DDP")

    @property
    def _zero3(self) -> bool:
        """DeepSpeed ZeRO stage 3: parameters are partitioned outside their module's own forward."""
        return self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3

    # ------------------------------------------------------------------ statistics over the whole optimizer step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step; for `stat_scope="global"` and a scheme that declares a scope
        statistic, also gather the scope values (token losses for topk/antiop) of all of them, on all ranks.

        Cost of `global`: one extra no-grad forward per micro-batch (plus the reference's, for a scheme that reads
        it), plus an all-gather of the valid tokens' values (4 bytes each) across ranks.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._scope_values = None
        if self.args.stat_scope == "global" and self.scheme.uses_scope_statistic and batch_samples:
            values = []
            with torch.no_grad():
                for batch in batch_samples:
                    batch = self._prepare_inputs(batch)
                    tok = self._token_inputs(self.model, batch, with_kl=False)
                    values.append(scope_values_of(self.scheme, tok, params=self.scheme_params))
            local = torch.cat(values) if values else torch.zeros(0, device=self.args.device)
            self._scope_values = self._cat_across_ranks(local)
        return batch_samples, num_items_in_batch

    def _cat_across_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """1-D float tensors of every rank, concatenated (NaN-padded all-gather); `x` itself on one process."""
        if self.accelerator.num_processes == 1:
            return x
        padded = self.accelerator.pad_across_processes(x, dim=0, pad_index=float("nan"))
        gathered = self.accelerator.gather(padded)
        return gathered[~torch.isnan(gathered)]

    def _sum_across_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.accelerator.num_processes == 1 else self.accelerator.reduce(x, reduction="sum")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model_inputs(inputs: dict) -> dict:
        out = {k: v for k, v in inputs.items() if k not in (REF_LOG_PROBS_KEY, DATA_WEIGHTS_KEY)}
        out["use_cache"] = False
        return out

    @staticmethod
    def _position_ids(inputs: dict):
        # Padding-free / packed batches carry position_ids and no attention mask
        return inputs.get("position_ids") if "attention_mask" not in inputs else None

    def _target_mask(self, inputs: dict) -> torch.Tensor:
        return shift_labels(inputs["labels"], self._position_ids(inputs)) != IGNORE_INDEX

    def _reference_log_probs(self, model, inputs: dict, mask: torch.Tensor, head: str) -> torch.Tensor:
        """Reference log-probs `(B, T-1)` float32, no gradient: the cache's, or the adapter-off policy's / the frozen
        copy's through the policy's own LM-head path `head` (`fused`, `chunked` or `logits`), so that at step 0 of a
        LoRA run (adapter B = 0) they equal the policy's bit for bit and every excess loss is exactly 0."""
        if self.ref_source == "cache":
            if REF_LOG_PROBS_KEY not in inputs:
                raise ValueError(
                    "ref_source=cache but the batch has no 'ref_log_probs': build the cache with `tokensft ref-cache` "
                    "and pass --ref_cache_dir."
                )
            return inputs[REF_LOG_PROBS_KEY][:, 1:].float()
        adapter = self.ref_source == "adapter"
        ref = model if adapter else self.ref_model
        with adapter_disabled(model) if adapter else torch.no_grad():
            if head == "chunked":
                return self._chunked_forward(ref, inputs, mask, reference=adapter).log_probs
            if head == "logits":
                return self._logits_forward(ref, inputs, mask).log_probs
            with self.accelerator.autocast():  # as accelerate's prepared forward; a no-op in fp32
                out = ref(**self._model_inputs(inputs), fused_lm_head=True)
            return self._fused_log_probs(out, ref, "the reference").float()

    def _chunked_forward(self, model, inputs: dict, mask: torch.Tensor, *, reference: bool = False,
                         **head: Any) -> TokenInputs:
        """The chunked head's `TokenInputs`: policy log-probs, entropy and the head needs' fields (per-token KL for
        `kl_direction`, top-K entropy for `topk_entropy_k`: `head_options`) from the backbone's hidden states, in
        chunks over the valid positions (`chunked_softmax_stats`: no `(B, T, V)` logits). `reference=True`: `model`
        runs as the adapter-off reference, so its output head is the reference's (the original copy under
        `modules_to_save`). Under `--bf16` the backbone forwards run in `accelerator.autocast()`
        here, not only through accelerate's wrapped `model.forward` (which a model that `train()` has not prepared,
        e.g. in `benchmarks/bench_train_step.py`, lacks); the head and every statistic stay in float32."""
        targets = shift_labels(inputs["labels"], self._position_ids(inputs))  # (B, T-1)
        inputs = self._model_inputs(inputs)
        inputs.pop("labels", None)
        with self.accelerator.autocast():  # --bf16: the backbone's matmuls (a no-op in fp32)
            hidden = model(**inputs, return_last_hidden=True)[:, :-1]  # (B, T-1, H)
        w, b, rw, rb = output_head_weights(model)
        if reference:
            w, b = rw, rb
        ref_hidden = None
        with_kl = head.get("kl_direction", "none") != "none"  # the KL's producer: the reference's hidden states
        if with_kl:
            with self.accelerator.autocast():
                if self.ref_source == "adapter":
                    with adapter_disabled(model):
                        ref_hidden = model(**inputs, return_last_hidden=True)[:, :-1]
                else:
                    with torch.no_grad():
                        ref_hidden = self.ref_model(**inputs, return_last_hidden=True)[:, :-1]
                    _, _, rw, rb = output_head_weights(self.ref_model)
            ref_hidden = ref_hidden[mask].to(rw.dtype)
        # the head, softmax statistics and KL in the head's dtype (float32 master weights under --bf16), never autocast
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            stats = chunked_softmax_stats(
                hidden[mask].to(w.dtype), targets[mask], weight=w, bias=b, ref_x=ref_hidden,
                ref_weight=rw if with_kl else None, ref_bias=rb if with_kl else None,
                chunk_size=self.args.loss_chunk_size, **head,
            )
        return TokenInputs(mask=mask, **_on_mask(mask, stats._asdict()))

    def loss_head_path(self, mask: torch.Tensor) -> str:
        """`--loss_head`, or for `auto`: `chunked` on CPU, `fused` (TRL's head) elsewhere, `logits` under ZeRO-3.

        Measured on CPU (`benchmarks/bench_train_step_cpu.py`, SmolLM2-135M, LoRA r=32, B=4, T=384, docs/performance.md):
        the chunked head, which scores only the supervised positions, takes 0.82x the step time of TRL's fused head
        (0.98x) and plain logits (0.89x), and beats even a bare PEFT + `F.cross_entropy` step (0.85x). On CUDA it
        is not measured yet, so TRL's head stays there.

        Args:
            mask: `(B, T-1)` bool, the supervised targets."""
        choice = self.args.loss_head
        if choice != "auto":
            return choice
        if self._zero3:  # the head's weight is gathered only inside its own forward: plain logits
            return "logits"
        if self._logit_transform is not None:  # the chunked head would ignore it
            return "logits" if mask.device.type == "cpu" else "fused"
        return "chunked" if mask.device.type == "cpu" else "fused"

    @staticmethod
    def _fused_log_probs(outputs, model, who: str) -> torch.Tensor:
        """`outputs.log_probs` of a `fused_lm_head=True` call. Raises RuntimeError (one line) when there are none
        (TRL's fused head not attached, or the forward replaced after it was, e.g. by a kernel patch): the output
        then holds logits and a plain-CE `loss`, which must never stand in for the weighted loss."""
        log_probs = getattr(outputs, "log_probs", None)
        if log_probs is None:
            raise RuntimeError(f"--loss_head fused: {who} returned no per-token log-probs (TRL's fused LM head is not "
                               f"attached to {type(unwrap(model)).__name__}); use --loss_head chunked or logits")
        return log_probs

    def _logits_forward(self, model, inputs: dict, mask: torch.Tensor):
        """Policy log-probs and entropy `(B, T-1)` from plain `(B, T, V)` logits: log-softmax over the supervised
        rows only (float32), the target entry gathered; entropy without grad. 0 off the mask."""
        targets = shift_labels(inputs["labels"], self._position_ids(inputs))  # (B, T-1)
        inputs = self._model_inputs(inputs)
        inputs.pop("labels", None)
        with self.accelerator.autocast():  # as accelerate's prepared forward; a no-op in fp32
            logits = model(**inputs).logits[:, :-1]  # (B, T-1, V)
        logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (n, V)
        lp = logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # (n,)
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)  # (n,)
        return TokenInputs(mask=mask, **_on_mask(mask, {"log_probs": lp, "entropy": ent}))

    def _token_alignment(self, inputs: dict, norm_directions: int = 0) -> torch.Tensor:
        """The producer of the need `token_alignment`: d_t = <grad l_t, G> `(B, T-1)` for the micro-batch
        (`tokensft.tracing.core.micro_batch_alignment`; with `norm_directions` k > 0 the estimated cosine a_t,
        directions seeded by the step), in eval mode with eager attention and forked RNG; nothing reaches `.grad`."""
        from ..tracing.callback import trace_guard
        from ..tracing.core import micro_batch_alignment, unwrap_model

        if self._position_ids(inputs) is not None:
            raise ValueError("the token alignment needs padded batches, not packed ones (padding_free)")
        base = unwrap_model(self.model)
        with trace_guard(base):
            return micro_batch_alignment(base, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                                         norm_directions=norm_directions,
                                         seed=self.args.seed * 1_000_003 + self.state.global_step)

    def _premise_due(self) -> bool:
        """`--log_premise` and the optimizer step in progress is one that logs."""
        every = self.args.logging_steps
        every = int(every) if every and every >= 1 else 1
        return bool(self.args.log_premise) and self.model.training and (self.state.global_step + 1) % every == 0

    def _needs(self, with_kl: bool) -> list[str]:
        """The needs to produce for this micro-batch: the scheme's, without the loss terms (the KL) when `with_kl` is
        False (the `stat_scope=global` pass: weights never read them), plus the premise metrics' `PREMISE_NEED` when
        they are due."""
        needs = [n for n in self.scheme.needs if with_kl or not NEEDS[n].loss_term]
        if with_kl and self._premise_due() and PREMISE_NEED not in needs:
            needs.append(PREMISE_NEED)
        return needs

    def _token_inputs(self, model, inputs: dict, *, with_kl: bool = True) -> TokenInputs:
        """The micro-batch's `TokenInputs`, `(B, T-1)` each, one producer per need: first what does not read the head
        pass (`token_alignment`: `_token_alignment`, before the training forward's graph exists, so its own passes
        do not add to that peak); then one LM-head pass gives `log_probs` (float32, differentiable), `mask`,
        `entropy` and the head needs' fields (KL, top-K entropy: only the chunked head computes them, so a scheme
        needing them takes it); then what reads the head pass (`ref_log_probs`: `_reference_log_probs`, through the
        same head and mask); `data_weights` and `segment_ids` (packed rows) come from the batch."""
        needs = self._needs(with_kl)
        params = self.scheme_params
        early = produce_needs(needs, params, {
            "token_alignment": lambda norm_directions: self._token_alignment(inputs, norm_directions)}, partial=True)
        head_kw = head_options(needs, params)
        mask = self._target_mask(inputs)
        head = "chunked" if head_kw else self.loss_head_path(mask)
        if head == "chunked" and (name := self._logit_transform) is not None:
            what = ", ".join(n for n in needs if NEEDS[n].head and NEEDS[n].options(params))
            why = f"mode {self.scheme.name!r} needs it ({what})" if head_kw else "--loss_head chunked"
            raise ValueError(f"the chunked LM head does not apply this model's {name}, and {why}: its log-probs "
                             "would differ from the model's; use --loss_head fused or logits with another mode")
        if head == "chunked":
            tok = self._chunked_forward(model, inputs, mask, **head_kw)
        elif head == "logits":
            tok = self._logits_forward(model, inputs, mask)
        else:
            with self.accelerator.autocast():  # as accelerate's prepared forward (TRL's head included)
                outputs = model(**self._model_inputs(inputs), fused_lm_head=True)
            tok = TokenInputs(self._fused_log_probs(outputs, model, "the model").float(), mask & outputs.label_mask,
                              entropy=outputs.entropy)
        late = produce_needs(needs, params, {
            "ref_log_probs": lambda: self._reference_log_probs(model, inputs, tok.mask, head)}, partial=True)
        position_ids = self._position_ids(inputs)
        return tok.replace(
            **early, **late,
            segment_ids=segment_ids_from_position_ids(position_ids)[:, 1:] if position_ids is not None else None,
            data_weights=inputs[DATA_WEIGHTS_KEY][:, 1:].float() if DATA_WEIGHTS_KEY in inputs else None,  # shifted
        )

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token-weighted loss of one micro-batch (`loss_from_log_probs`), already scaled for gradient accumulation.

        With `normalization="token"` and `num_items_in_batch` (the valid targets of the whole optimizer step, all
        ranks), the objective is exact under gradient accumulation; otherwise the per-micro-batch value is divided by
        the number of accumulation steps here. The micro-batch's token statistics go to `StepTokenStats` (logged
        as `nll`, `weight/*`, `token_loss/median`, `entropy`, `kl`, `ref/p_mean` by `log`).
        """
        cfg = self.args
        split = "train" if self.model.training else "eval"
        tok = self._token_inputs(model, inputs)
        exact = cfg.normalization == "token" and num_items_in_batch is not None
        out = loss_from_log_probs(
            tok, self.scheme, params=self.scheme_params, stat_scope=cfg.stat_scope,
            scope_values=self._scope_values if self.model.training else None,
            reduction=Reduction(cfg.normalization, num_items_in_batch if exact else None),
        )
        loss = out.loss
        if self.model.training:
            if exact:
                # `num_items_in_batch` counts every rank's tokens and DDP averages gradients across ranks
                if cfg.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes
            else:
                loss = loss / self.current_gradient_accumulation_steps
        self._token_stats[split].add(out)
        if tok.alignment is not None and self._premise_due():
            counts = premise_counts(tok, params=self._premise_params)
            for k, v in counts.items():
                self._premise[k] = self._premise[k] + v if k in self._premise else v
        return (loss, {"log_probs": tok.log_probs, "weights": out.weights}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the token statistics of every micro-batch since the last log, reduced over all ranks (a collective:
        `Trainer` calls `log` on every rank)."""
        split = "train" if self.model.training else "eval"
        acc = self._token_stats[split]
        if acc:
            stats = acc.compute(sum_across=self._sum_across_ranks, cat_across=self._cat_across_ranks)
            logs.update({("eval_" if split == "eval" else "") + k: v for k, v in stats.items()})
        if split == "train" and self.args.log_premise:  # every rank takes part in the reduction
            keys = sorted(self._premise) or ["n"]
            sums = torch.stack([self._premise.get(k, torch.zeros((), device=self.args.device)).float() for k in keys])
            sums = self._sum_across_ranks(sums.to(self.args.device))
            if self._premise or float(sums.sum()) > 0:
                logs.update(premise_metrics(dict(zip(keys, sums.tolist()))))
            self._premise = {}
        super().log(logs, start_time)
