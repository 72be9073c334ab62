"""Train entry point: data -> tokenized dataset -> `TokenSFTTrainer` -> saved adapter/model + the exact config used."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from ..data import CompletionCollator, load_records
from ..io import RESULTS_FILE, RUN_CONFIG_FILE, InputError, atomic_write, dir_lock
from ..losses import get_scheme
from ..models import load_tokenizer, resolve_model
from ..runtime import environment, set_threads
from .config import DataArguments, ModelArguments, TokenSFTConfig
from .data_cache import cached_sft_dataset
from .outputs import (
    FINAL_TMP,
    check_output_dir,
    config_changes,
    plan_output_dir,
    publish_final,
    read_segments,
    write_segments,
)
from .reference import resolved_ref_source
from .trainer import TokenSFTTrainer

logger = logging.getLogger("tokensft.train")
BUILTIN_PREFIX = "builtin:"
CONFIG_FILE = RUN_CONFIG_FILE


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file in the same directory + `os.replace`)."""
    atomic_write(path, text)


def load_training_records(data_args: DataArguments, *, source: str | None = None, limit: int | None = None,
                          split: str | None = None) -> list[dict]:
    """Rows of the training (or eval) data: `builtin:arithmetic`, a local file, or a hub dataset name."""
    source = source or data_args.dataset
    limit = limit if limit is not None else data_args.dataset_limit
    if source.startswith(BUILTIN_PREFIX):
        return load_records(source, split=split or "train", limit=limit or data_args.builtin_num_examples,
                            builtin_max_steps=data_args.builtin_max_steps)
    return load_records(source, split=split or data_args.dataset_split, limit=limit,
                        hub_config=data_args.dataset_hub_config)


def peft_config_from(model_args: ModelArguments):
    """`peft.LoraConfig` from the model arguments, or None without `--use_peft`."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        modules_to_save=model_args.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )


def config_dict(cfg: TokenSFTConfig, model_args: ModelArguments, data_args: DataArguments) -> dict:
    """The exact configuration of a run as plain YAML-able data (what `tokensft train --config` reads back)."""

    def plain(dc):
        out = {}
        for f in dataclasses.fields(dc):
            v = getattr(dc, f.name)
            if isinstance(v, enum.Enum):
                out[f.name] = v.value
            elif isinstance(v, (str, int, float, bool, type(None))):
                out[f.name] = v
            elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
                out[f.name] = list(v)
            elif isinstance(v, dict) and f.name == "scheme_args":
                out[f.name] = dict(v)
        return out

    d = {**plain(data_args), **plain(model_args), **plain(cfg)}
    for k in ("hub_token", "logging_dir", "local_rank"):
        d.pop(k, None)
    return d


def _time_estimate_callback():
    """Logs, after the first optimizer steps of a session, how long a step takes and how long the run will take."""
    from transformers import TrainerCallback

    class TimeEstimate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0 = time.time(), state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            done = state.global_step - self.step0
            if done in (1, 3) and state.max_steps > state.global_step:  # the first step also warms up: say both
                per = (time.time() - self.t0) / done
                left = per * (state.max_steps - state.global_step)
                logger.info("%.1f s/step over %d step(s): about %.0f min for the remaining %d of %d steps", per, done,
                            left / 60, state.max_steps - state.global_step, state.max_steps)

    return TimeEstimate()


# What a resumed segment must share with the run it continues (else refused, or recorded with --allow_config_change):
# everything that decides which batches it sees and what it computes on them; the built-in scheme parameters are added
# from their declarations (`resume_keys`). Step counts, logging, saving, threads and tracing may change.
RESUME_KEYS = (
    "mode", "scheme_args", "stat_scope", "normalization", "prompt_loss_weight", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "optim", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "max_length",
    "padding_free", "bf16", "fp16", "dataset", "dataset_preset", "dataset_split", "dataset_hub_config",
    "dataset_limit", "builtin_num_examples", "builtin_max_steps", "template", "system_prompt", "token_weights_field",
    "model", "dtype", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "lora_modules_to_save", "ref_source", "ref_model_name_or_path", "ref_cache_dir",
)


def resume_keys() -> tuple[str, ...]:
    """`RESUME_KEYS` plus every built-in scheme parameter's flag (from `tokensft.losses.builtin_params`)."""
    from ..losses import builtin_params

    return RESUME_KEYS + tuple(n for n in builtin_params() if n not in RESUME_KEYS)


def _segment_callback(out: Path, segments: list[dict], t0: float, is_main: bool):
    """Keeps the last entry of `segments` (this segment) up to date in `train_segments.json`: its end step and
    wall-clock seconds, at every checkpoint save and at most every 30 s, so a killed segment's time still counts."""
    from transformers import TrainerCallback

    class SegmentClock(TrainerCallback):
        last = 0.0

        def _write(self, state, force: bool) -> None:
            now = time.time()
            if not is_main or not (force or now - self.last >= 30):
                return
            self.last = now
            segments[-1].update(end_step=state.global_step, runtime_s=round(now - t0, 2))
            write_segments(out, segments)

        def on_step_end(self, args, state, control, **kwargs):
            self._write(state, force=False)

        def on_save(self, args, state, control, **kwargs):
            self._write(state, force=True)

    return SegmentClock()


LOG_LINE_KEYS = ("loss", "nll", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy")


def _compact_progress_callback():
    """transformers' progress bar, but each logging step writes one short line to stderr (`step 5/30  loss 1.234
    nll 1.301 ...`, 4 significant digits) instead of the whole log dict to stdout; the full logs still go to
    `trainer_state.json` and the `report_to` integrations."""
    import sys

    from transformers.trainer_callback import ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (state.is_world_process_zero and self.training_bar is not None and logs):
                return
            parts = [f"step {state.global_step}/{state.max_steps}"]
            parts += [f"{k} {logs[k]:.4g}" for k in LOG_LINE_KEYS if isinstance(logs.get(k), (int, float))]
            if "train_runtime" in logs:
                parts.append(f"train_runtime {logs['train_runtime']:.1f} s")
            self.training_bar.write("  ".join(parts), file=sys.stderr)

    return CompactProgress()


def _checkpoint_step(path: str) -> int:
    return int(json.loads((Path(path) / "trainer_state.json").read_text()).get("global_step") or 0)


def load_run_tokenizer(cfg: TokenSFTConfig, model_args: ModelArguments):
    """The model's tokenizer with `--chat_template_path` (a `.jinja` / `.j2` file) applied before anything is
    tokenized, so the data, the saved tokenizer and TRL (which sets the same template again) agree.

    Raises:
        InputError: the template file cannot be read.
    """
    tokenizer = load_tokenizer(model_args.model)
    if cfg.chat_template_path:
        try:
            tokenizer.chat_template = Path(cfg.chat_template_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--chat_template_path {cfg.chat_template_path}: cannot read it ({e})") from None
    return tokenizer


def build_datasets(cfg: TokenSFTConfig, model_args: ModelArguments, data_args: DataArguments, tokenizer):
    """Tokenized train (and optional eval) `datasets.Dataset` with `input_ids` and `labels` (and `weights`) columns.

    Raises:
        InputError: a data file, row or field that cannot be used (one line naming it), before any model loads.
    """
    try:
        return _build_datasets(cfg, model_args, data_args, tokenizer)
    except (ValueError, KeyError, UnicodeDecodeError, FileNotFoundError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from e


def _build_datasets(cfg: TokenSFTConfig, model_args: ModelArguments, data_args: DataArguments, tokenizer):
    records = load_training_records(data_args)
    weights = {"prompt_loss_weight": cfg.prompt_loss_weight, "token_weights_field": data_args.token_weights_field}
    train = cached_sft_dataset(records, tokenizer, preset=data_args.dataset_preset, max_length=cfg.max_length or 1024,
                              template=data_args.template, system_prompt=data_args.system_prompt,
                              source=data_args.dataset, **weights)
    eval_ds = None
    if data_args.eval_dataset:
        ev = load_training_records(data_args, source=data_args.eval_dataset, limit=data_args.eval_limit,
                                   split="test" if data_args.eval_dataset.startswith(BUILTIN_PREFIX) else None)
        eval_ds = cached_sft_dataset(ev, tokenizer, preset=data_args.dataset_preset, max_length=cfg.max_length or 1024,
                                    template=data_args.template, system_prompt=data_args.system_prompt,
                                    source=data_args.eval_dataset, **weights)
    if cfg.ref_source == "cache":
        from .ref_cache import attach_ref_cache

        train = attach_ref_cache(train, cfg.ref_cache_dir, model=cfg.ref_model_name_or_path or model_args.model,
                                 tokenizer=tokenizer,
                                 template=data_args.template, max_length=cfg.max_length)
    return train, eval_ds


def train(cfg: TokenSFTConfig, model_args: ModelArguments, data_args: DataArguments, *, callbacks=None) -> dict:
    """Fine-tune `model_args.model` with `cfg.mode` and save the adapter/model, tokenizer and config.

    The output directory is checked first (`check_output_dir`: never the model's, the data's or the cache's
    files) and locked for the whole run (`tokensft.io.dir_lock`: a second training into it is refused).

    Returns:
        Dict with `output_dir`, `train_runtime_s`, `final_nll` (plain CE of the last logged step), `nll_last10`
        (its mean over the last 10 logged steps: less noisy with small batches), `global_step`.

    Raises:
        InputError: an unsafe or busy `--output_dir`, or bad data (one line).
    """
    from ..models import cache_dir

    out = Path(cfg.output_dir)
    check_output_dir(out, inputs={"--model": model_args.model, "--ref_model_name_or_path": cfg.ref_model_name_or_path,
                                  "--dataset": data_args.dataset}, caches={"the model cache": cache_dir()})
    with dir_lock(out):
        return _train(cfg, model_args, data_args, callbacks=callbacks)


def _train(cfg: TokenSFTConfig, model_args: ModelArguments, data_args: DataArguments, *, callbacks=None) -> dict:
    t0 = time.time()
    out = Path(cfg.output_dir)
    plan = plan_output_dir(out, resume=cfg.resume_from_checkpoint, overwrite=bool(cfg.overwrite_output_dir),
                           max_steps=int(cfg.max_steps or 0))
    if plan["action"] == "done":  # a finished run asked to resume: nothing to train, nothing rewritten
        logger.info("%s already finished at step %s (%s): nothing to do", out, plan["results"].get("global_step"),
                    RESULTS_FILE)
        return {**plan["results"], "already_finished": True}
    run_config = config_dict(cfg, model_args, data_args)
    # the reference as the trainer will resolve it, as the saved configuration records it
    run_config["ref_source"] = resolved_ref_source(cfg.ref_source, get_scheme(cfg.mode), model_args.use_peft) \
        or run_config.get("ref_source")
    segments = read_segments(out) if plan["resume"] is not None else []
    changed: dict = {}
    if plan["resume"] is not None and (out / CONFIG_FILE).is_file():
        try:
            saved = yaml.safe_load((out / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            saved = {}
        changed = config_changes(saved, yaml.safe_load(yaml.safe_dump(run_config)), resume_keys())
        if changed and not cfg.allow_config_change:
            what = "; ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise InputError(f"--resume_from_checkpoint: {out} was trained with other settings ({what}); resume with "
                             "the run's own (its tokensft_config.yaml), or pass --allow_config_change true to continue "
                             "with these (each segment's settings are kept in train_segments.json)")
        if changed:
            logger.warning("resuming %s with changed settings: %s", out, ", ".join(changed))
    model_path = resolve_model(model_args.model)
    tokenizer = load_run_tokenizer(cfg, model_args)
    train_ds, eval_ds = build_datasets(cfg, model_args, data_args, tokenizer)
    set_threads("train", cfg.threads, device="cpu" if cfg.use_cpu else None)
    cfg.dataset_kwargs = {**(cfg.dataset_kwargs or {}), "skip_prepare_dataset": True}
    cfg.model_init_kwargs = {**(cfg.model_init_kwargs or {}), "dtype": model_args.dtype}
    if model_args.attn_implementation:
        cfg.model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    cfg.remove_unused_columns = False
    collator = CompletionCollator(tokenizer.pad_token_id, padding_free=bool(cfg.padding_free),
                                  pad_to_multiple_of=cfg.pad_to_multiple_of)
    callbacks = [*list(callbacks or []), _time_estimate_callback()]
    if getattr(cfg, "trace_every_n_steps", 0):
        from ..tracing.callback import build_trace_callback

        cb = build_trace_callback(cfg, train_ds, tokenizer)
        if cb is not None:
            callbacks.append(cb)
    trainer = TokenSFTTrainer(
        model=model_path, args=cfg, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        data_collator=collator, peft_config=peft_config_from(model_args), callbacks=callbacks,
    )
    if not cfg.disable_tqdm:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_compact_progress_callback())
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # from here until the final save the run is incomplete
    run_config = config_dict(cfg, model_args, data_args)  # with what the trainer resolved (the reference used)
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(run_config, sort_keys=True))
    resume = plan["resume"]
    start_step = _checkpoint_step(resume) if resume is not None else 0
    segments.append({"start_step": start_step, "end_step": start_step, "runtime_s": 0.0,
                     "changed": {k: list(v) for k, v in changed.items()}, "config": run_config})
    if trainer.is_world_process_zero():
        write_segments(out, segments)
    trainer.add_callback(_segment_callback(out, segments, t0, trainer.is_world_process_zero()))
    if resume is not None and 0 < int(cfg.max_steps or 0) <= _checkpoint_step(resume):
        # killed after its last checkpoint but before the final save: that checkpoint is the finished model
        logger.info("%s is at --max_steps %s: nothing left to train; saving it as the final model", resume,
                    cfg.max_steps)
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=resume)
    # the final model appears whole or not at all: saved aside, moved in, then train_results.json (written last)
    tmp = out / FINAL_TMP
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    save_whole_model(trainer, tmp)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        # Trainer also pickles its arguments next to the weights; the YAML config above is the readable, safe copy
        (tmp / "training_args.bin").unlink(missing_ok=True)
        publish_final(tmp, out)
    history = [h for h in trainer.state.log_history if "nll" in h]
    results = {
        "output_dir": str(out),
        "mode": cfg.mode,
        "model": model_args.model,
        "global_step": trainer.state.global_step,
        "train_runtime_s": round(sum(float(g.get("runtime_s") or 0) for g in segments[:-1]) + time.time() - t0, 2),
        "segments": len(segments),
        "final_nll": history[-1]["nll"] if history else None,
        "nll_last10": sum(h["nll"] for h in history[-10:]) / len(history[-10:]) if history else None,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "num_train_examples": len(train_ds),
        "dtype": "bfloat16" if cfg.bf16 else ("float16" if cfg.fp16 else "float32"),
        "environment": environment(),
    }
    premise = [{"step": h.get("step"), **{k: v for k, v in h.items() if k.startswith("premise/")}}
               for h in trainer.state.log_history if "premise/opposing_frac" in h]
    if premise:  # --log_premise: the series `tokensft trace analyze` summarises
        results["premise"] = premise
    if trainer.is_world_process_zero():
        segments[-1].update(end_step=trainer.state.global_step, runtime_s=round(time.time() - t0, 2))
        write_segments(out, segments)
        atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2))
    return {**results, "trainer": trainer}


def save_whole_model(trainer, path: str | os.PathLike) -> None:
    """Save the trained model as one loadable Hugging Face (or PEFT adapter) directory at `path`; call it on every
    rank (under FSDP it gathers the parameters, a collective). transformers' `save_model` writes no weights at all
    under FSDP with a sharded state dict (`fsdp_state_dict_type: SHARDED_STATE_DICT`, as in
    configs/accelerate/fsdp.yaml: its checkpoints are `pytorch_model_fsdp_0/` shards); here the full state dict is
    gathered (`accelerator.get_state_dict`) and rank 0 saves it, as transformers does for `FULL_STATE_DICT`."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(getattr(plugin, "state_dict_type", "")):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.args.should_save:
            trainer._save(str(path), state_dict=state_dict)
    else:
        trainer.save_model(str(path))
