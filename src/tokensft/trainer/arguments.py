"""Every option of `tokensft train` that tokensft owns, declared once (`tokensft.options.Option`): the model and data
arguments, the loss / reference / runtime options of `TokenSFTConfig`, the tracer's (`tokensft.tracing.config`) and
the schemes' parameters (`tokensft.losses`); plus the range checks tokensft adds to a few of TRL's own options
(`TRL_CHECKS`). The dataclasses TRL's parser reads get their fields from these declarations, and
`tokensft.cli.train.precheck` validates a command line against them before transformers is imported (about a second).
Imports nothing heavy (torch, for the loss registry, at most).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.arithmetic import DEFAULT_MAX_STEPS
from ..data.loading import BUILTIN_DEFAULT_ROWS
from ..data.presets import PRESETS
from ..losses import NORMALIZATIONS, STAT_SCOPES
from ..options import Option, declare_fields, validate_fields
from ..tracing.config import TRACE_OPTIONS

__all__ = ["ALL_OPTIONS", "DATA_OPTIONS", "LOSS_HEADS", "MODEL_OPTIONS", "REF_SOURCES", "TRAIN_OPTIONS", "TRL_CHECKS",
           "TRL_OPTIONS", "UNHONOURED", "DataArguments", "ModelArguments", "declared_options", "typed_value",
           "unhonoured_problem"]

REF_SOURCES = ("adapter", "model", "cache")
LOSS_HEADS = ("auto", "fused", "chunked", "logits")

MODEL_OPTIONS = (
    Option("model", str, "smollm2-135m-instruct", "Hub id, local dir, .gguf file or alias."),
    Option("use_peft", bool, False, "Train a LoRA adapter (PEFT)."),
    Option("lora_r", int, 16, "LoRA rank.", low=1),
    Option("lora_alpha", int, 32, "LoRA alpha (scale = alpha / r).", low=1),
    Option("lora_dropout", float, 0.05, "LoRA dropout.", low=0, high=1, high_open=True),
    Option("lora_target_modules", str, None, "Modules that get LoRA (default: all-linear).", nullable=True, nargs="+"),
    Option("lora_modules_to_save", str, None, "Modules trained in full beside the adapter, e.g. lm_head.",
           nullable=True, nargs="+"),
    Option("dtype", str, "float32", "Weights' dtype when the model loads.",
           choices=("float32", "bfloat16", "float16", "auto")),
    Option("attn_implementation", str, None, "eager, sdpa, flash_attention_2, ...", nullable=True),
)

DATA_OPTIONS = (
    Option("dataset", str, "builtin:arithmetic", "Path, hub name, or builtin:arithmetic."),
    Option("dataset_preset", str, None, "Column preset (default: detected from the first row).", nullable=True,
           choices=tuple(PRESETS)),
    Option("dataset_split", str, "train", "Split of a hub dataset."),
    Option("dataset_hub_config", str, None, "Config name of a hub dataset.", nullable=True),
    Option("dataset_limit", int, None, "Use only the first N rows.", low=1, nullable=True),
    Option("builtin_num_examples", int, BUILTIN_DEFAULT_ROWS, "Rows of builtin:arithmetic.", low=1),
    Option("builtin_max_steps", int, DEFAULT_MAX_STEPS, "builtin:arithmetic: most operations per problem.", low=1,
           high=8),
    Option("template", str, "auto", "Prompt template: the chat template when the tokenizer has one (auto), chat, or "
           "plain.", choices=("auto", "chat", "plain")),
    Option("system_prompt", str, None, "Optional system message.", nullable=True),
    Option("token_weights_field", str, None, "Column of per-token loss weights (a list of floats >= 0 per row, one per "
           "supervised token), multiplied into the scheme's weights.", nullable=True),
    Option("eval_dataset", str, None, "Optional held-out data for eval loss.", nullable=True),
    Option("eval_limit", int, None, "Use only the first N eval rows.", low=1, nullable=True),
)

TRAIN_OPTIONS = (  # TokenSFTConfig's own, besides mode / scheme_files / scheme_args (validated by the registry)
    Option("stat_scope", str, "micro_batch", "Scope of a scheme's statistic (topk/antiop): micro_batch (reference "
           "study), sequence, or global (whole optimizer step over GA micro-batches and ranks; one extra no-grad "
           "forward per micro-batch).", choices=STAT_SCOPES),
    Option("normalization", str, "token", "token: sum / num_items_in_batch (exact under GA); micro_batch: mean over "
           "counted tokens (reference study); weight: sum(w l) / sum(w).", choices=NORMALIZATIONS),
    Option("ref_source", str, None, "Reference for sft-lr/KL modes: adapter | model | cache (auto by --use_peft).",
           choices=REF_SOURCES, nullable=True),
    Option("ref_model_name_or_path", str, None, "ref_source=model: reference checkpoint (default: the starting "
           "model).", nullable=True),
    Option("ref_cache_dir", str, None, "ref_source=cache: directory built by `tokensft ref-cache`.", nullable=True),
    Option("prompt_loss_weight", float, 0.0, "Weight of the prompt tokens in the loss (WIT, arXiv:2507.07817): 0 = "
           "completion only; lambda > 0 supervises every prompt token after the first with data weight lambda, and "
           "they count in num_items_in_batch like completion tokens.", low=0),
    Option("threads", int, 0, "CPU threads for torch: 0 = chosen by measurement when training starts (1 thread or "
           "every core, whichever runs a training-sized matmul faster on this machine now; tokensft.runtime); "
           "OMP_NUM_THREADS, when set, is kept. Ignored on CUDA.", low=0),
    Option("overwrite_output_dir", bool, False, "Train again from scratch over an --output_dir that holds a run (its "
           "checkpoints, traces and results are removed). Without it such a run is refused; --resume_from_checkpoint "
           "true continues it from its newest complete checkpoint."),
    Option("allow_config_change", bool, False, "Resume (--resume_from_checkpoint) although the mode, a scheme "
           "parameter, the learning rate schedule, the batch, the data, the model or the LoRA setup differ from the "
           "run's saved configuration (refused by default, naming each changed key); every segment's configuration "
           "is kept in train_segments.json."),
    Option("log_premise", bool, False, "At every logged step, measure each token's gradient alignment with the "
           "micro-batch's (one extra backward + forward-mode JVP per micro-batch of that step) and log premise/*: how "
           "well sft-topk's and sft-antiop's down-weighting detects the truly opposing tokens (precision, recall)."),
    Option("loss_chunk_size", int, 256, "Tokens per chunk of the full-vocabulary KL / top-K entropy.", low=1),
    Option("loss_head", str, "auto", "LM-head path for schemes without KL / top-K entropy: auto (chunked on CPU, fused "
           "on CUDA, logits under DeepSpeed ZeRO-3), fused (TRL's, every position), chunked (supervised positions, "
           "token chunks), logits (plain (B, T, V) logits). Same loss on every path; only speed and memory differ.",
           choices=LOSS_HEADS),
    Option("flush_denormal", bool, False, "CPU: flush denormal floats to zero (torch.set_flush_denormal). The KL and "
           "p-weighted modes produce denormal gradients that slow x86 CPUs many-fold (docs/performance.md)."),
)

TRL_CHECKS = (  # TRL's / transformers' own options, declared there; the range tokensft checks on top (same type)
    Option("max_length", int, 1024, "Tokens kept per sequence (the start).", low=1, nullable=True),
    Option("learning_rate", float, 2e-5, "Peak learning rate.", low=0),
    Option("per_device_train_batch_size", int, 8, "Sequences per micro-batch and device.", low=1),
    Option("gradient_accumulation_steps", int, 1, "Micro-batches per optimizer step.", low=1),
    Option("max_steps", int, -1, "Optimizer steps (-1: set by num_train_epochs).", low=-1),
    Option("num_train_epochs", float, 3.0, "Epochs when max_steps is -1.", low=0, low_open=True),
    Option("warmup_steps", float, 0, "Warm-up steps (a value < 1 is a fraction of the run).", low=0),
    Option("seed", int, 42, "Seed of the data order, the initialisation and dropout."),
    Option("weight_decay", float, 0.0, "AdamW weight decay.", low=0),
    Option("max_grad_norm", float, 1.0, "Gradient clipping norm (0: none).", low=0),
    Option("logging_steps", float, 10, "Log every N optimizer steps (a value < 1 is a fraction of the run).",
           low=0, low_open=True),
    Option("save_steps", float, 500, "Save a checkpoint every N steps (a value < 1 is a fraction of the run).",
           low=0, low_open=True),
)


# Every option TRL's SFTConfig adds to transformers' TrainingArguments, and what tokensft does with it: None = honoured
# (used as TRL uses it), or (is it set?, why not) = refused in one line when set. A TRL upgrade that adds an option fails
# tests/trainer/test_configs.py until it is classified here. The CLI's precheck refuses them before TRL is imported
# (`unhonoured_problem`). Of TrainingArguments' own options, those tokensft's loss
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


def typed_value(value):
    """A raw command-line string as the value TRL's parser would make of it (for the refusal rules above)."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def unhonoured_problem(values: dict) -> str | None:
    """The one-line refusal of the first TRL option in `values` (raw strings or YAML values) that tokensft does not
    honour (`UNHONOURED`), or None."""
    for name, is_set, why in UNHONOURED:
        if name in values and is_set(typed_value(values[name])):
            return f"--{name} {typed_value(values[name])} is not supported: {why}"
    return None


def declared_options() -> dict[str, Option]:
    """Every declared option of `tokensft train` by name: model, data, train, trace, TRL checks and the built-in
    schemes' parameters (`tokensft.losses.builtin_params`)."""
    from ..losses import builtin_params

    out = {o.name: o for group in (MODEL_OPTIONS, DATA_OPTIONS, TRAIN_OPTIONS, TRACE_OPTIONS, TRL_CHECKS) for o in group}
    out.update(builtin_params())
    return out


ALL_OPTIONS = MODEL_OPTIONS + DATA_OPTIONS + TRAIN_OPTIONS + TRACE_OPTIONS + TRL_CHECKS


@dataclass
@declare_fields(MODEL_OPTIONS)
class ModelArguments:
    """Which model to fine-tune and how (LoRA or full): one field per `MODEL_OPTIONS` declaration (model, use_peft,
    lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_modules_to_save, dtype, attn_implementation).

    Raises (at construction):
        ValueError: a value outside its declaration (one line naming the flag).
    """

    def __post_init__(self):
        validate_fields(self, MODEL_OPTIONS)


@dataclass
@declare_fields(DATA_OPTIONS)
class DataArguments:
    """Training data: one field per `DATA_OPTIONS` declaration (dataset: a local .jsonl/.json/.parquet path, a hub
    dataset name or `builtin:arithmetic`; dataset_preset; dataset_split / dataset_hub_config; dataset_limit;
    builtin_num_examples / builtin_max_steps; template; system_prompt; token_weights_field; eval_dataset / eval_limit).
    Per-message weights need no option: an assistant message's `"weight"` in `messages` data (0 = unsupervised).

    Raises (at construction):
        ValueError: a value outside its declaration (one line naming the flag).
    """

    def __post_init__(self):
        validate_fields(self, DATA_OPTIONS)
