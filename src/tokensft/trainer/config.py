"""Configuration of `tokensft train`: `TokenSFTConfig(SFTConfig)` + model and data arguments.

All three are dataclasses parsed together by TRL's `TrlParser` (`--config file.yaml` plus `--key value` overrides),
so every field is also a command-line flag and a YAML key. The tracer's `trace_*` options are mixed into
`TokenSFTConfig` from `tokensft.tracing.config.TraceConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import SFTConfig

from ..data.arithmetic import DEFAULT_MAX_STEPS
from ..data.loading import BUILTIN_DEFAULT_ROWS
from ..losses import (
    NEEDS,
    NORMALIZATIONS,
    STAT_SCOPES,
    all_params,
    available_modes,
    builtin_params,
    get_scheme,
    load_scheme_file,
    param_users,
    validate_loss_options,
)
from ..tracing.config import TraceConfig

REF_SOURCES = ("adapter", "model", "cache")
LOSS_HEADS = ("auto", "fused", "chunked", "logits")

# Every option TRL's SFTConfig adds to transformers' TrainingArguments, and what tokensft does with it: None = honoured
# (used as TRL uses it), or (is it set?, why not) = refused in one line when set. A TRL upgrade that adds an option fails
# tests/trainer/test_configs.py until it is classified here. Of TrainingArguments' own options, those tokensft's loss
# replaces are refused too (label_smoothing_factor, use_liger_kernel).
TRL_OPTIONS: dict = {
    "model_init_kwargs": None,  # merged with --dtype / --attn_implementation when the model loads
    "trust_remote_code": None,  # TRL's model loading
    "router_aux_loss_coef": (lambda v: v not in (None, 0, 0.0),
                             "tokensft's loss does not add a Mixture-of-Experts router auxiliary loss"),
    "chat_template_path": (lambda v: v is not None and not str(v).endswith((".jinja", ".j2")),
                           "tokensft applies a .jinja / .j2 template file before it tokenizes the data; cloning a "
                           "template from another tokenizer (which adds tokens) is not supported"),
    "dataset_text_field": (lambda v: v not in (None, "text"),
                           "tokensft reads prompt/completion columns by --dataset_preset, not a text field"),
    "dataset_kwargs": (lambda v: bool(set(v or {}) - {"skip_prepare_dataset"}),
                       "tokensft tokenizes the data itself (skip_prepare_dataset); no other dataset_kwargs apply"),
    "dataset_num_proc": (lambda v: v is not None, "tokensft tokenizes in one process, once (cached on disk)"),
    "eos_token": (lambda v: v is not None,
                  "tokensft supervises the chat template's own end-of-turn token; TRL would set eos_token after the "
                  "data are tokenized, so the saved tokenizer would disagree with what was trained"),
    "max_length": None,  # tokens kept per sequence (the start)
    "truncation_mode": (lambda v: str(getattr(v, "value", v)) not in ("keep_start", "None"),
                        "tokensft keeps the start of a sequence that is too long (truncation_mode keep_start)"),
    "shuffle_dataset": (lambda v: bool(v), "the data loader already shuffles every epoch (--seed)"),
    "packing": (bool, "tokensft tokenizes the data itself (completion-only labels) and does not pack; use "
                      "--padding_free true"),
    "packing_strategy": (lambda v: str(getattr(v, "value", v)) != "bfd", "tokensft does not pack (see --packing)"),
    "padding_free": None,  # CompletionCollator(padding_free=True)
    "pad_to_multiple_of": None,  # CompletionCollator(pad_to_multiple_of=...)
    "eval_packing": (lambda v: v is not None, "tokensft does not pack (see --packing)"),
    "completion_only_loss": (lambda v: v is False, "tokensft always supervises the completion tokens only"),
    "assistant_only_loss": (bool, "tokensft already supervises the assistant turns only"),
    "loss_type": (lambda v: v not in (None, "nll"),
                  "tokensft selects the loss with --mode (e.g. --mode dft), not TRL's --loss_type"),
    "activation_offloading": None,  # TRL's training_step, which tokensft does not override
    "pad_token": (lambda v: v is not None,
                  "tokensft pads with the tokenizer's own pad token (masked out of attention and loss); TRL would set "
                  "it after the data are tokenized"),
    "label_smoothing_factor": (lambda v: bool(v), "tokensft's --mode decides the per-token loss; label smoothing "
                                                  "is not one of its terms"),
    "use_liger_kernel": (bool, "tokensft computes per-token log-probs with its own chunked LM head; Liger's fused "
                               "loss would be bypassed"),
}
UNHONOURED = tuple((name, rule[0], rule[1]) for name, rule in TRL_OPTIONS.items() if rule is not None)

def _scheme_param_fields(cls):
    """Add one dataclass field per parameter of a built-in scheme (default, type and help from the declaration).
    Only the built-ins' (`builtin_params`): a `--scheme_files` scheme's parameters never become fields, even when its
    file was imported before this module (as the CLI's precheck does); they go through `--scheme_args`."""
    for name, p in builtin_params().items():
        if name in cls.__dict__.get("__annotations__", {}):
            continue
        cls.__annotations__[name] = p.type.__name__
        help_text = p.help_text(param_users(name))
        kwargs = {"choices": list(p.choices)} if p.choices else {}
        setattr(cls, name, field(default=p.default, metadata={"help": help_text, **kwargs}))
    return cls


def _modes_help() -> str:
    lines = []
    for m in available_modes():
        s = get_scheme(m)
        params = ", ".join(f"{p.name}={p.default}" for p in s.params)
        lines.append(f"{m} ({s.description}{'; ' + params if params else ''})")
    return "; ".join(lines)


@dataclass
@_scheme_param_fields
class TokenSFTConfig(SFTConfig, TraceConfig):
    """`SFTConfig` plus the token-weighting options.

    Parameters:
        mode (`str`, defaults to `"sft"`): loss mode: sft, dft, sft+kl, asft, sft-topk, sft-antiop, sft-lr, or any
            scheme registered with `tokensft.losses.register_scheme` (e.g. in a `--scheme_files` file).
        scheme_files (`list[str]`, *optional*): Python files that call `register_scheme`, imported before `mode` is
            checked; their schemes' parameters are set with `--scheme_args`.
        scheme_args (`dict` or `list[str]`, *optional*): scheme parameters as `key=value` items (or a YAML
            mapping), for the parameters that have no flag of their own (those of `--scheme_files` schemes).
        <scheme parameters>: one field per parameter a built-in scheme declares (`topk_keep_ratio` 0.7,
            `antiop_clip_mult` 3.0, `lr_weight_alpha` 1.0, `kl_weight` 0.05, `kl_direction` "forward"), generated
            from the declarations in `tokensft.losses.schemes`; validated against their declared range here.
        stat_scope (`str`, defaults to `"micro_batch"`): scope of a scheme's statistic: micro_batch, sequence, global.
        normalization (`str`, defaults to `"token"`): token, micro_batch or weight (see `tokensft.losses.core`).
        ref_source (`str`, *optional*): reference model for sft-lr / KL modes: adapter (LoRA switched off; default
            with --use_peft), model (frozen copy; default without LoRA) or cache (precomputed log-probs).
        ref_model_name_or_path (`str`, *optional*): reference for `ref_source=model` (default: the starting model).
        ref_cache_dir (`str`, *optional*): directory of a cache built by `tokensft ref-cache` (`ref_source=cache`).
        prompt_loss_weight (`float`, defaults to 0.0): weight λ of the prompt tokens (WIT); 0 = completion only.
        log_premise (`bool`, defaults to False): log `premise/*` (how well loss-based down-weighting detects the
            tokens whose gradient opposes the micro-batch's) at every logged step; costs a JVP on those steps.
        loss_chunk_size (`int`, defaults to 256): tokens per chunk of the full-vocabulary KL / top-K entropy.
        loss_head (`str`, defaults to "auto"): how per-token log-probs come out of the LM head for schemes without
            KL or top-K entropy: `fused` (TRL's fused head over every position), `chunked` (ours: supervised positions
            only, in token chunks) or `logits` (plain `(B, T, V)` logits, then the supervised rows); `auto` picks by
            device: `chunked` on CPU, `fused` on CUDA (see `TokenSFTTrainer.loss_head_path`). Every path gives the same
            loss up to float rounding, and the reference's log-probs take the policy's path.
        flush_denormal (`bool`, defaults to False): on CPU, flush denormal floats to zero for the whole process.

    TRL options that tokensft does not honour (`loss_type` other than nll, `use_liger_kernel`, `packing`,
    `completion_only_loss=False`, `assistant_only_loss`) are refused with the reason. `bf16` defaults to True where
    bf16 is native (a bf16-capable GPU, or a CPU with avx512_bf16 / AMX) and to fp32 elsewhere; `--bf16 false` forces
    fp32.

    Raises (at construction, before any model loads):
        ValueError: one line naming the flag: unknown mode, scope, normalization, ref source or scheme parameter, a
            parameter out of its declared range, an unhonoured TRL option, or a missing scheme file.
    """

    mode: str = field(default="sft", metadata={"help": f"Loss mode: {_modes_help()}; or a scheme registered in one "
                                                        "of --scheme_files."})
    scheme_files: list[str] | None = field(
        default=None, metadata={"help": "Python files calling tokensft.losses.register_scheme, imported before --mode "
                                "is checked (a user scheme without editing tokensft).", "nargs": "+"},
    )
    scheme_args: list[str] | None = field(
        default=None, metadata={"help": "Scheme parameters as key=value (e.g. --scheme_args my_param=0.3); needed for "
                                "the parameters of --scheme_files schemes.", "nargs": "+"},
    )
    stat_scope: str = field(
        default="micro_batch",
        metadata={"help": "Scope of a scheme's statistic (topk/antiop): micro_batch (reference study), sequence, or "
                  "global (whole optimizer step over GA micro-batches and ranks; one extra no-grad forward per "
                  "micro-batch).", "choices": list(STAT_SCOPES)},
    )
    normalization: str = field(
        default="token",
        metadata={"help": "token: sum / num_items_in_batch (exact under GA); micro_batch: mean over counted tokens "
                  "(reference study); weight: sum(w l) / sum(w).", "choices": list(NORMALIZATIONS)},
    )
    ref_source: str | None = field(
        default=None, metadata={"help": "Reference for sft-lr/KL modes: adapter | model | cache (auto by --use_peft)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "ref_source=model: reference checkpoint (default: the starting model)."}
    )
    ref_cache_dir: str | None = field(
        default=None, metadata={"help": "ref_source=cache: directory built by `tokensft ref-cache`."}
    )
    prompt_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the prompt tokens in the loss (WIT, arXiv:2507.07817): 0 = completion only; "
                  "lambda > 0 supervises every prompt token after the first with data weight lambda, and they count in "
                  "num_items_in_batch like completion tokens."},
    )
    threads: int = field(
        default=0,
        metadata={"help": "CPU threads for torch: 0 = chosen by measurement when training starts (1 thread or every "
                  "core, whichever runs a training-sized matmul faster on this machine now; tokensft.runtime); "
                  "OMP_NUM_THREADS, when set, is kept. Ignored on CUDA."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train again from scratch over an --output_dir that holds a run (its checkpoints, traces and "
                  "results are removed). Without it such a run is refused; --resume_from_checkpoint true continues "
                  "it from its newest complete checkpoint."},
    )
    allow_config_change: bool = field(
        default=False,
        metadata={"help": "Resume (--resume_from_checkpoint) although the mode, a scheme parameter, the learning rate "
                  "schedule, the batch, the data, the model or the LoRA setup differ from the run's saved "
                  "configuration (refused by default, naming each changed key); every segment's configuration is kept "
                  "in train_segments.json."},
    )
    log_premise: bool = field(
        default=False,
        metadata={"help": "At every logged step, measure each token's gradient alignment with the micro-batch's "
                  "(one extra backward + forward-mode JVP per micro-batch of that step) and log premise/*: how well "
                  "sft-topk's and sft-antiop's down-weighting detects the truly opposing tokens (precision, recall)."},
    )
    loss_chunk_size: int = field(default=256, metadata={"help": "Tokens per chunk of the full-vocabulary KL / top-K "
                                                                 "entropy."})
    loss_head: str = field(
        default="auto",
        metadata={"help": "LM-head path for schemes without KL / top-K entropy: auto (chunked on CPU, fused on CUDA), fused (TRL's, every "
                  "position), chunked (supervised positions, token chunks), logits (plain (B, T, V) logits). Same "
                  "loss on every path; only speed and memory differ.", "choices": ["auto", "fused", "chunked", "logits"]},
    )
    flush_denormal: bool = field(
        default=False,
        metadata={"help": "CPU: flush denormal floats to zero (torch.set_flush_denormal). The KL and p-weighted modes "
                  "produce denormal gradients that slow x86 CPUs many-fold (docs/performance.md)."},
    )

    def __post_init__(self):
        for path in self.scheme_files or []:
            load_scheme_file(path)
        if self.mode not in available_modes():
            raise ValueError(f"--mode {self.mode!r} is unknown; choose one of {', '.join(available_modes())}")
        self.scheme_args = self._parse_scheme_args(self.scheme_args)
        validate_loss_options(self.mode, params=self.scheme_params(), stat_scope=self.stat_scope,
                              normalization=self.normalization)
        for name, p in builtin_params().items():  # every flag in range, also those of other modes
            setattr(self, name, p.validate(getattr(self, name)))
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length >= 1):
            raise ValueError(f"--max_length must be an integer >= 1 (tokens kept per sequence), got {self.max_length}")
        if not (isinstance(self.prompt_loss_weight, (int, float)) and math.isfinite(self.prompt_loss_weight)
                and self.prompt_loss_weight >= 0):
            raise ValueError(f"--prompt_loss_weight must be a finite number >= 0, got {self.prompt_loss_weight}")
        if not (isinstance(self.threads, int) and self.threads >= 0):
            raise ValueError(f"--threads must be an integer >= 0 (0 = choose by measurement), got {self.threads}")
        if self.loss_head not in LOSS_HEADS:
            raise ValueError(f"--loss_head must be one of {', '.join(LOSS_HEADS)}, got {self.loss_head!r}")
        if self.ref_source is not None and self.ref_source not in REF_SOURCES:
            raise ValueError(f"--ref_source must be one of {', '.join(REF_SOURCES)}, got {self.ref_source!r}")
        unpacked = [n for n in get_scheme(self.mode).needs if not NEEDS[n].packed]
        if self.padding_free and (unpacked or self.log_premise):
            what = f"--mode {self.mode} (needs {unpacked[0]})" if unpacked else "--log_premise"
            raise ValueError(f"--padding_free true is not supported with {what}: its producer runs each row on its "
                             "own and needs padded batches")
        for name, is_set, why in UNHONOURED:
            if is_set(getattr(self, name, None)):
                raise ValueError(f"--{name} {getattr(self, name)} is not supported: {why}")
        import torch

        on_gpu = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 is None and not self.fp16:
            # bf16 mixed precision (TRL's default) where it pays: a bf16-capable GPU, or a CPU whose bf16 matmuls
            # measure >= 1.5x fp32's (runtime.cpu_bf16_pays: Zen 4 and AMX Xeons, 0.67-0.71x the fp32 step, held-out
            # NLL within 0.001 nats/token after 12 steps; not a Xeon whose hypervisor hides AMX, where bf16 is
            # slower; docs/performance.md); fp32 elsewhere
            from .. import runtime

            self.bf16 = bool(torch.cuda.is_bf16_supported()) if on_gpu else runtime.cpu_bf16_pays()
        if self.bf16 and not on_gpu and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            # bf16 autocast on the CPU: transformers refuses bf16 without a GPU unless told the run is on the CPU
            self.use_cpu = True
        if self.dataloader_pin_memory:
            # pinned memory only helps a host-to-GPU copy; without one, torch warns on every data loader
            self.dataloader_pin_memory = bool(torch.cuda.is_available() and not self.use_cpu)
        # transformers >= 5.x renamed `gradient_checkpointing*` to `activation_checkpointing*` and warns on the old
        # names, which TRL still sets (default True): hand the value over under the new name, silently
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old, None) is not None:
                setattr(self, new, getattr(self, old))
        super().__post_init__()

    @staticmethod
    def _parse_scheme_args(items) -> dict | None:
        """`key=value` items (or a YAML mapping) -> {name: value validated against its declaration}."""
        if not items:
            return None
        pairs = []
        for item in (items.items() if isinstance(items, dict) else items):
            if isinstance(item, tuple):
                key, value = item
            else:
                key, sep, value = str(item).partition("=")
                if not sep or not key:
                    raise ValueError(f"--scheme_args: {item!r} is not key=value")
            pairs.append((str(key), value))
        out = {}
        for key, value in pairs:
            if key not in all_params():
                raise ValueError(f"--scheme_args: unknown scheme parameter {key!r} (a parameter of a scheme of your "
                                 f"own needs its file in --scheme_files); declared: {', '.join(all_params())}")
            if key in builtin_params():
                raise ValueError(f"--scheme_args: {key} has its own flag; use --{key} {value}")
            out[key] = all_params()[key].validate(value)
        return out

    def scheme_params(self) -> dict:
        """The resolved parameters of `mode`: its flags and `scheme_args`, declared defaults for the rest.

        Raises:
            ValueError: a value out of its declared range (naming the flag).
        """
        scheme = get_scheme(self.mode)
        flags = builtin_params()
        values = {p.name: getattr(self, p.name) for p in scheme.params if p.name in flags}
        values.update(self.scheme_args or {})
        return scheme.resolve_params(values)


@dataclass
class ModelArguments:
    """Which model to fine-tune and how (LoRA or full).

    Parameters:
        model (`str`): hub id, local checkpoint directory, `.gguf` file, or alias `smollm2-135m-instruct`.
        use_peft (`bool`): train a LoRA adapter instead of all weights.
        lora_r / lora_alpha / lora_dropout: LoRA rank, scale and dropout.
        lora_target_modules (`list[str]`): modules that get LoRA (default `all-linear`).
        lora_modules_to_save (`list[str]`): modules trained in full next to the adapter (e.g. `lm_head`).
        dtype (`str`): float32 (default), bfloat16, float16 or auto.
        attn_implementation (`str`): e.g. eager, sdpa, flash_attention_2.
    """

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Hub id, local dir, .gguf file or alias."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (PEFT)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get LoRA (default: all-linear).", "nargs": "+"}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full beside the adapter, e.g. lm_head.", "nargs": "+"}
    )
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})


@dataclass
class DataArguments:
    """Training data.

    Parameters:
        dataset (`str`): local .jsonl/.json/.parquet path, hub dataset name, or `builtin:arithmetic`.
        dataset_preset (`str`): column preset: math, gsm8k, alpaca, prompt_completion, messages (default: detected).
        dataset_split / dataset_hub_config: split and config name for hub datasets.
        dataset_limit (`int`): use only the first N rows.
        template (`str`): prompt template: auto (chat template when the tokenizer has one), chat or plain.
        system_prompt (`str`): optional system message.
        token_weights_field (`str`): column of per-token loss weights, one per supervised token. Per-message weights
            need no option: an assistant message's `"weight"` in `messages` data (0 = unsupervised).
        eval_dataset / eval_limit: optional held-out set for eval loss (plain NLL is logged too).
    """

    dataset: str = field(default="builtin:arithmetic", metadata={"help": "Path, hub name, or builtin:arithmetic."})
    dataset_preset: str | None = field(default=None, metadata={"help": "math, gsm8k, alpaca, prompt_completion, messages."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    dataset_hub_config: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    dataset_limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    builtin_num_examples: int = field(default=BUILTIN_DEFAULT_ROWS, metadata={"help": "Rows of builtin:arithmetic."})
    builtin_max_steps: int = field(default=DEFAULT_MAX_STEPS,
                                   metadata={"help": "builtin:arithmetic: most operations per problem."})
    template: str = field(default="auto", metadata={"help": "auto, chat or plain."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    token_weights_field: str | None = field(
        default=None, metadata={"help": "Column of per-token loss weights (a list of floats >= 0 per row, one per "
                                "supervised token), multiplied into the scheme's weights."},
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Optional held-out data for eval loss."})
    eval_limit: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})
