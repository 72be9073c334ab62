"""Configuration of `tokensft train`: `TokenSFTConfig(SFTConfig)` + model and data arguments.

All three are dataclasses parsed together by TRL's `TrlParser` (`--config file.yaml` plus `--key value` overrides),
so every field is also a command-line flag and a YAML key. The tracer's `trace_*` options are mixed into
`TokenSFTConfig` from `tokensft.tracing.config.TraceConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..losses import NORMALIZATIONS, STAT_SCOPES, available_modes
from ..tracing.config import TraceConfig

REF_SOURCES = ("adapter", "model", "cache")


@dataclass
class TokenSFTConfig(SFTConfig, TraceConfig):
    """`SFTConfig` plus the token-weighting options.

    Parameters:
        mode (`str`, defaults to `"sft"`): loss mode: sft, dft, sft+kl, asft, sft-topk, sft-antiop, sft-lr, or any
            scheme registered with `tokensft.losses.register_scheme`.
        topk_keep_ratio (`float`, defaults to 0.7): share of lowest-loss tokens `sft-topk` keeps.
        antiop_clip_mult (`float`, defaults to 3.0): c of `sft-antiop` (tokens above c x median loss are clipped).
        lr_weight_alpha (`float`, defaults to 1.0): alpha of `sft-lr`.
        kl_weight (`float`, defaults to 0.05): beta of the KL modes (`sft+kl`, `asft`).
        kl_direction (`str`, defaults to `"forward"`): KL(p_ref || p_theta) ("forward", the reference study's) or
            KL(p_theta || p_ref) ("reverse").
        stat_scope (`str`, defaults to `"micro_batch"`): scope of topk/antiop statistics: micro_batch, sequence, global.
        normalization (`str`, defaults to `"token"`): token, micro_batch or weight (see `tokensft.losses.core`).
        ref_source (`str`, *optional*): reference model for sft-lr / KL modes: adapter (LoRA switched off; default
            with --use_peft), model (frozen copy; default without LoRA) or cache (precomputed log-probs).
        ref_model_name_or_path (`str`, *optional*): reference for `ref_source=model` (default: the starting model).
        ref_cache_dir (`str`, *optional*): directory of a cache built by `tokensft ref-cache` (`ref_source=cache`).
        loss_chunk_size (`int`, defaults to 256): tokens per chunk of the full-vocabulary KL.
        flush_denormal (`bool`, defaults to False): on CPU, flush denormal floats to zero for the whole process.

    Unlike TRL, `bf16` defaults to True only on a bf16-capable GPU (fp32 on CPU).
    """

    mode: str = field(default="sft", metadata={"help": f"Loss mode, one of: {', '.join(available_modes())}."})
    topk_keep_ratio: float = field(default=0.7, metadata={"help": "sft-topk: share of lowest-loss tokens kept."})
    antiop_clip_mult: float = field(default=3.0, metadata={"help": "sft-antiop: clip tokens with loss > c x median."})
    lr_weight_alpha: float = field(default=1.0, metadata={"help": "sft-lr: w = max(0.1, 1 + alpha (p_ref - p))."})
    kl_weight: float = field(default=0.05, metadata={"help": "sft+kl / asft: beta of the KL term."})
    kl_direction: str = field(
        default="forward", metadata={"help": "KL(p_ref||p_theta) ('forward', reference study) or 'reverse'."}
    )
    stat_scope: str = field(
        default="micro_batch",
        metadata={"help": "Scope of topk/antiop statistics: micro_batch (reference study), sequence, or global "
                  "(whole optimizer step over GA micro-batches and ranks; one extra no-grad forward per micro-batch)."},
    )
    normalization: str = field(
        default="token",
        metadata={"help": "token: sum / num_items_in_batch (exact under GA); micro_batch: mean over counted tokens "
                  "(reference study); weight: sum(w l) / sum(w)."},
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
    loss_chunk_size: int = field(default=256, metadata={"help": "Tokens per chunk of the full-vocabulary KL."})
    flush_denormal: bool = field(
        default=False,
        metadata={"help": "CPU: flush denormal floats to zero (torch.set_flush_denormal). The KL and p-weighted modes "
                  "produce denormal gradients that slow x86 CPUs many-fold (docs/performance.md)."},
    )

    def __post_init__(self):
        if self.mode not in available_modes():
            raise ValueError(f"--mode {self.mode!r} is unknown; choose one of {', '.join(available_modes())}")
        if self.stat_scope not in STAT_SCOPES:
            raise ValueError(f"--stat_scope must be one of {STAT_SCOPES}, got {self.stat_scope!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.ref_source is not None and self.ref_source not in REF_SOURCES:
            raise ValueError(f"--ref_source must be one of {REF_SOURCES}, got {self.ref_source!r}")
        if self.kl_direction not in ("forward", "reverse"):
            raise ValueError(f"--kl_direction must be forward or reverse, got {self.kl_direction!r}")
        if self.bf16 is None and not self.fp16:
            # TRL defaults to bf16 mixed precision; on a CPU that is slow and inexact, so default to fp32 there
            import torch

            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.use_cpu)
        super().__post_init__()


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
        eval_dataset / eval_limit: optional held-out set for eval loss (plain NLL is logged too).
    """

    dataset: str = field(default="builtin:arithmetic", metadata={"help": "Path, hub name, or builtin:arithmetic."})
    dataset_preset: str | None = field(default=None, metadata={"help": "math, gsm8k, alpaca, prompt_completion, messages."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    dataset_hub_config: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    dataset_limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    builtin_num_examples: int = field(default=2000, metadata={"help": "Rows of builtin:arithmetic."})
    builtin_max_steps: int = field(default=4, metadata={"help": "builtin:arithmetic: most operations per problem."})
    template: str = field(default="auto", metadata={"help": "auto, chat or plain."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Optional held-out data for eval loss."})
    eval_limit: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})
