"""Configuration of `tokensft train`: `TokenSFTConfig(SFTConfig)` + model and data arguments.

All three are dataclasses parsed together by TRL's `TrlParser` (`--config file.yaml` plus `--key value` overrides),
so every field is also a command-line flag and a YAML key. The tracer's `trace_*` options are mixed into
`TokenSFTConfig` from `tokensft.tracing.config.TraceConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..losses import (
    NEEDS,
    all_params,
    available_modes,
    builtin_params,
    get_scheme,
    load_scheme_file,
    param_users,
    validate_loss_options,
)
from ..options import declare_fields, validate_fields
from ..tracing.config import TraceConfig
from .arguments import (
    LOSS_HEADS,
    REF_SOURCES,
    TRAIN_OPTIONS,
    TRL_CHECKS,
    TRL_OPTIONS,
    UNHONOURED,
    DataArguments,
    ModelArguments,
)

__all__ = ["LOSS_HEADS", "REF_SOURCES", "TRL_OPTIONS", "UNHONOURED", "DataArguments", "ModelArguments",
           "TokenSFTConfig"]



def _modes_help() -> str:
    lines = []
    for m in available_modes():
        s = get_scheme(m)
        params = ", ".join(f"{p.name}={p.default}" for p in s.params)
        lines.append(f"{m} ({s.description}{'; ' + params if params else ''})")
    return "; ".join(lines)


@dataclass
# one field per parameter of a built-in scheme (`builtin_params`): a `--scheme_files` scheme's parameters never become
# fields, even when its file was imported before this module (as the CLI's precheck does); they go through --scheme_args
@declare_fields(builtin_params().values(), help_of=lambda p: p.help_text(param_users(p.name)))
@declare_fields(TRAIN_OPTIONS)
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
            device: `chunked` on CPU, `fused` on CUDA, `logits` under DeepSpeed ZeRO-3 (where the head's weight is whole
            only inside its own forward; see `TokenSFTTrainer.loss_head_path`). Every path gives the same
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

    def __post_init__(self):
        for path in self.scheme_files or []:
            load_scheme_file(path)
        if self.mode not in available_modes():
            raise ValueError(f"--mode {self.mode!r} is unknown; choose one of {', '.join(available_modes())}")
        self.scheme_args = self._parse_scheme_args(self.scheme_args)
        validate_loss_options(self.mode, params=self.scheme_params(), stat_scope=self.stat_scope,
                              normalization=self.normalization)
        validate_fields(self, builtin_params().values())  # every scheme flag in range, also those of other modes
        validate_fields(self, TRAIN_OPTIONS)  # every range and choice, from its declaration (trainer.arguments)
        for opt in TRL_CHECKS:  # TRL's own options: checked, left as TRL holds them
            opt.validate(getattr(self, opt.name))
        self.validate_trace_config()  # the --trace_* options, before any model loads
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
