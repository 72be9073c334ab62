"""`TokenGradTraceCallback`: trace per-token gradients of a few training sequences every N optimizer steps.

At each trace step (`state.global_step % trace_every_n_steps == 0`, and before the first update when
`trace_at_start`), rank 0 picks `trace_num_sequences` rows of the training set with a seeded rule, runs its own
forward/backward passes on the unwrapped model and writes one trace file through `tokensft.tracing.schema`.

Training is not changed: the trace runs in eval mode (no dropout, no gradient checkpointing) with eager attention,
inside `torch.random.fork_rng`, takes gradients with `torch.autograd.grad` on detached copies of the traced weights
(nothing reaches `.grad`, the optimizer or DDP's reducer), and restores every module's `training` flag, the attention
implementation and every `.grad` afterwards. Other ranks do not trace and no collective is issued.

Source: the reference study (per-position traces every N steps, token categories); issue 5 (per-token-loss
gradients, storage, invariances).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, fields

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from ..tokens import readable_tokens
from .config import TraceConfig
from .core import (
    IGNORE_INDEX,
    Projector,
    decoder_param_names,
    eager_attention,
    forward_backward,
    micro_batch_alignment,
    model_parts,
    per_position_from_capture,
    per_token_loss_alignment,
    select_trace_modules,
    token_stats,
    unwrap_model,
)
from .schema import read_manifest, write_trace_step

logger = logging.getLogger("tokensft.tracing")

FP16_MAX = 65504.0


# ----------------------------------------------------------------------------------------------------------------
# sequences
# ----------------------------------------------------------------------------------------------------------------
def row_tensors(row: dict, index: int, max_length: int) -> tuple[list[int], list[int]]:
    """`input_ids` and `labels` of one tokenized training row, cut to `max_length` tokens.

    Labels come from the `labels` column (-100 on non-targets); else from `completion_mask` / `assistant_masks`
    (1 = target); else every token is a target.

    Raises:
        ValueError: no `input_ids`, or a label/mask column of another length (names the row).
    """
    if "input_ids" not in row:
        raise ValueError(f"train_dataset row {index}: no 'input_ids' column (columns: {sorted(row)})")
    ids = [int(t) for t in row["input_ids"]]
    if row.get("labels") is not None:
        labels = [int(t) for t in row["labels"]]
        col = "labels"
    else:
        col = next((c for c in ("completion_mask", "assistant_masks") if row.get(c) is not None), None)
        mask = row[col] if col else [1] * len(ids)
        labels = [t if int(m) else IGNORE_INDEX for t, m in zip(ids, mask)]
        if col and len(mask) != len(ids):
            labels = None
    if labels is None or len(labels) != len(ids):
        raise ValueError(f"train_dataset row {index}: column {col!r} has another length than input_ids ({len(ids)})")
    return ids[:max_length], labels[:max_length]


def choose_sequences(dataset, num: int, *, seed: int, step: int, selection: str = "random",
                     max_length: int = 1024) -> list[int]:
    """Row indices to trace: a permutation from `np.random.default_rng([seed, step])` (`random`) or
    `default_rng([seed])` (`fixed`), keeping the first `num` rows with at least one target within `max_length`.

    The rule depends only on (seed, step, dataset), so a resumed run traces what an uninterrupted one would.
    """
    n = len(dataset)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, step] if selection == "random" else [seed])
    out = []
    for i in rng.permutation(n)[: max(1000, 20 * num)]:
        ids, labels = row_tensors(dataset[int(i)], int(i), max_length)
        if any(lab != IGNORE_INDEX for lab in labels[1:]):
            out.append(int(i))
            if len(out) == num:
                break
    return out


# ----------------------------------------------------------------------------------------------------------------
# invariance guard
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def trace_guard(model: nn.Module) -> Iterator[None]:
    """Run the block on `model` without changing training: RNG streams forked, eval mode, eager attention, grad mode
    on; every module's `training` flag and every parameter's `.grad` restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        try:
            model.eval()
            with eager_attention(model), torch.enable_grad():
                yield
        finally:
            for m, t in flags:
                m.training = t
            for p, g in grads:
                if p.grad is not g:
                    p.grad = g


def _sharded(model: nn.Module) -> bool:
    for p in model.parameters():
        if hasattr(p, "ds_id") or p.numel() == 0 or type(p).__name__ in ("DTensor", "FlatParameter"):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------------------------
class TokenGradTraceCallback(TrainerCallback):
    """Write per-token gradient traces of a few training sequences every `trace_every_n_steps` optimizer steps.

    Args:
        trace_config: a `TraceConfig` (or any object with the `trace_*` attributes, e.g. the trainer's config).
        train_dataset: tokenized rows with `input_ids` and `labels` (-100 on non-targets), lists of ints.
        tokenizer: the run's tokenizer (or processor); used to decode and categorise tokens.
        output_dir: run directory; traces go to `output_dir/traces/` (see `tokensft.tracing.schema`).
        mode: loss mode of the run (stored in the metadata).
        scheme_kwargs: scheme parameters by name (the run's flags and `scheme_args`); declared defaults fill the
            rest.

    When: at `on_train_begin` if `trace_at_start` (step 0; a resumed run only when its step is a multiple of N), then
    at every `on_step_end` with `global_step % trace_every_n_steps == 0`; steps already in the manifest are skipped
    (resume). An error in the first trace of a run is raised; later ones are logged and that step is skipped.
    Under FSDP / DeepSpeed ZeRO-3 (sharded parameters) tracing is disabled with a warning.

    Raises:
        ValueError: invalid `trace_*` options, or a train_dataset row without `input_ids`.
    """

    def __init__(self, trace_config, train_dataset, tokenizer, *, output_dir: str, mode: str = "sft",
                 scheme_kwargs: dict | None = None):
        names = {f.name for f in fields(TraceConfig)}
        self.cfg = TraceConfig(**{n: getattr(trace_config, n) for n in names if hasattr(trace_config, n)})
        self.cfg.validate_trace_config()
        self.quantities = self.cfg.trace_quantity_list()
        self.dataset = train_dataset
        self.tokenizer = tokenizer
        self.output_dir = str(output_dir)
        self.mode = mode
        self.scheme_kwargs = dict(scheme_kwargs or {})
        self._model_id = None
        self._modules: dict[str, nn.Linear] = {}
        self._projector: Projector | None = None
        self._n_traces = 0
        self._disabled = False
        self._fp16_warned = False
        self.timings: list[dict] = []  # seconds per trace step

    # -- trainer events --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        every = self.cfg.trace_every_n_steps
        if every > 0 and self.cfg.trace_at_start and state.global_step % every == 0:
            self.maybe_trace(state.global_step, kwargs.get("model"), is_world_zero=state.is_world_process_zero,
                             progress=not getattr(args, "disable_tqdm", True))

    def on_step_end(self, args, state, control, **kwargs):
        every = self.cfg.trace_every_n_steps
        if every > 0 and state.global_step % every == 0:
            self.maybe_trace(state.global_step, kwargs.get("model"), is_world_zero=state.is_world_process_zero,
                             progress=not getattr(args, "disable_tqdm", True))

    # -- tracing ---------------------------------------------------------------------------------------------
    def maybe_trace(self, step: int, model: nn.Module | None, *, is_world_zero: bool = True, progress=False):
        """Trace at `step` unless this is not rank 0, tracing is disabled, or the step is already recorded."""
        if not is_world_zero or self._disabled or model is None:
            return
        if any(e["step"] == step for e in read_manifest(self.output_dir)):
            return
        model = unwrap_model(model)
        if _sharded(model):
            warnings.warn("tracing disabled: parameters are sharded (FSDP / DeepSpeed ZeRO-3); rank 0 alone cannot "
                          "run the model", stacklevel=2)
            self._disabled = True
            return
        first = self._n_traces == 0
        try:
            self.trace_step(step, model, progress=progress)
        except Exception:  # noqa: BLE001 - a failed trace must not kill a long run, except the first one
            if first:
                raise
            logger.error("trace at step %d failed and was skipped:\n%s", step, traceback.format_exc())
        self._n_traces += 1

    def _setup(self, model: nn.Module) -> None:
        if self._model_id == id(model):
            return
        self._modules = select_trace_modules(model, self.cfg.trace_modules)
        self._projector = Projector.build(self._modules, factor=self.cfg.trace_proj_factor,
                                          max_dim=self.cfg.trace_proj_dim, seed=self.cfg.trace_seed)
        self._model_id = id(model)

    def trace_step(self, step: int, model: nn.Module, *, progress: bool = False):
        """Trace the chosen sequences on `model` (unwrapped) and write `traces/step_XXXXXXXX.*`. Returns the path."""
        t0 = time.perf_counter()
        self._setup(model)
        cfg = self.cfg
        rows = choose_sequences(self.dataset, cfg.trace_num_sequences, seed=cfg.trace_seed, step=step,
                                selection=cfg.trace_sequence_selection, max_length=cfg.trace_max_length)
        if len(rows) < cfg.trace_num_sequences:
            warnings.warn(f"trace step {step}: only {len(rows)} of {cfg.trace_num_sequences} requested sequences have "
                          "supervised targets", stacklevel=2)
        arrays, seq_meta = {}, []
        with trace_guard(model):
            for i, row in enumerate(rows):
                ids, labels = row_tensors(self.dataset[row], row, cfg.trace_max_length)
                seq_arrays = self.trace_sequence(model, ids, labels, progress=progress)
                arrays.update({f"s{i}.{k}": v for k, v in seq_arrays.items()})
                texts, cats = readable_tokens(self.tokenizer, ids)
                seq_meta.append({"index": i, "example_index": row, "tokens": texts, "categories": cats,
                                 "length": len(ids)})
        self._check_fp16(arrays, step)
        meta = self.metadata(model, seq_meta)
        path = write_trace_step(self.output_dir, step, meta, arrays)
        dt = time.perf_counter() - t0
        self.timings.append({"step": step, "seconds": dt})
        logger.info("traced %d sequence(s) at step %d in %.1f s -> %s", len(rows), step, dt, path)
        return path

    def trace_sequence(self, model: nn.Module, ids: list[int], labels: list[int], *, progress=False) -> dict:
        """All arrays of one sequence (without the `s{i}.` prefix), as CPU tensors in the schema's layout."""
        cfg = self.cfg
        parts = model_parts(model)
        device = next(parts.decoder.parameters()).device
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        lab_t = torch.tensor([labels], dtype=torch.long, device=device)
        modules = self._modules
        weights = [m.weight for m in modules.values()]
        wdict = {n: w for n, w in zip(decoder_param_names(parts, weights), weights)}
        want_pos = "per_position" in self.quantities
        cap = forward_backward(parts, ids_t, lab_t, wdict, modules if want_pos else None)
        stats = {k: v.cpu() for k, v in cap.stats.items()}
        mask = stats["mask"]
        nan = torch.tensor(math.nan)

        def masked(v):  # (..., T) -> NaN off the targets
            return torch.where(mask, v.float(), nan)

        out = {
            "token_ids": torch.tensor(ids, dtype=torch.int32),
            "is_completion": mask.to(torch.uint8),
            "loss": masked(stats["loss"]),
            "p": masked(stats["p"]),
            "entropy": masked(stats["entropy"]),
        }
        if want_pos:
            pp = per_position_from_capture(cap, self._projector, keep_projections=cfg.trace_store_projections)
            for k in ("dot", "norm", "alignment", "layer.dot", "layer.norm", "layer.alignment"):
                out[f"pos.{k}"] = pp[k].float()  # every position: prompt positions carry gradient too (part of G)
            out["pos.layer.G_norm"] = pp["layer.G_norm"].float()
            out["pos.G_norm"] = pp["G_norm"].float().reshape(1)
            if cfg.trace_store_projections:
                for li, (xp, dyp) in enumerate(zip(pp["x_proj"], pp["dy_proj"])):
                    out[f"pos.{li}.x_proj"] = xp
                    out[f"pos.{li}.dy_proj"] = dyp
        traced_dot = None
        if "per_token_loss" in self.quantities:
            tl = per_token_loss_alignment(
                model, ids_t, lab_t, weights, method=cfg.trace_alignment_method, norms=cfg.trace_token_norms,
                num_directions=cfg.trace_norm_directions, batch_size=cfg.trace_batch_size, seed=cfg.trace_seed,
                return_projection=cfg.trace_store_projections, capture=cap, progress=progress,
            )
            for k in ("dot", "norm", "alignment"):
                out[f"tokloss.{k}"] = masked(tl[k])
            out["tokloss.G_norm"] = tl["G_norm"].float().reshape(1)
            if "grad_proj" in tl:
                out["tokloss.grad_proj"] = tl["grad_proj"]
            traced_dot = tl["dot"]  # d_t over the traced weights: the alignment a scheme reads, already here
        out.update({f"weight.{k}": masked(v) for k, v in
                    self.scheme_weights(model, parts, ids_t, lab_t, stats, traced=wdict,
                                        traced_dot=traced_dot).items()})
        return out

    def traced_schemes(self) -> dict[str, tuple]:
        """`trace_key -> (Scheme, resolved parameters)` of every registered scheme declared `traced`."""
        from ..losses import available_modes, get_scheme

        out = {}
        for name in available_modes():
            scheme = get_scheme(name)
            if scheme.traced:
                out[scheme.trace_key] = (scheme, scheme.resolve_params(self.scheme_kwargs, strict=False))
        return out

    def scheme_weights(self, model, parts, ids_t, lab_t, stats, *, traced: dict[str, torch.Tensor],
                       traced_dot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Weight each traced scheme would give each token of this sequence, from the loss pipeline
        (`loss_from_log_probs`) with the scheme statistics over this sequence alone.

        The tracer's producer of each need (`tokensft.losses.NEEDS`), each run once per sequence and options:
        `entropy` from the traced forward; `ref_log_probs` from the model with its LoRA adapter disabled (without
        PEFT there is none, and the scheme's weights are NaN); `topk_entropy` from one more no-grad forward;
        `token_alignment`, like everything the tracer measures, over the traced weights (`traced`, name -> tensor;
        under LoRA by default the trainable ones, so the trainer's quantity): d_t is the traced `tokloss.dot`
        (`traced_dot` `(T,)`, nothing recomputed); without it (no `per_token_loss` quantity), or for the estimated
        cosine, `micro_batch_alignment` on this sequence when the run's own scheme needs it, else NaN weights (one
        more backward and JVP per sequence only for the run that trains on it); `ref_distribution` as zeros (a KL
        scheme's weights never read the KL).
        """
        from ..losses import (
            TokenInputs,
            get_scheme,
            loss_from_log_probs,
            produce_needs,
            topk_entropy,
        )

        lp, mask = stats["log_probs"][None], stats["mask"][None]  # (1, T), token frame: t is predicted at t-1
        memo: dict = {}

        def once(key, make):
            if key not in memo:
                memo[key] = make()
            return memo[key]

        def shifted_to_token_frame(x: torch.Tensor) -> torch.Tensor:  # (1, T-1) target frame -> (1, T)
            return torch.cat([torch.zeros_like(lp[:, :1]), x.float().to(lp.device)], dim=1)

        def topk(topk_entropy_k: int) -> torch.Tensor:
            with torch.no_grad():
                logits = once("logits", lambda: parts.head(parts.hidden(ids_t))[0])  # (T, V)
            return shifted_to_token_frame(topk_entropy(logits[:-1], topk_entropy_k)[None])

        def alignment(norm_directions: int) -> torch.Tensor | None:
            if traced_dot is not None and norm_directions == 0:
                return torch.where(mask, traced_dot[None].float().to(lp.device), torch.zeros_like(lp))
            if "token_alignment" not in get_scheme(self.mode).needs:  # this producer's own need
                return None  # not measured in this trace: NaN weights
            return shifted_to_token_frame(micro_batch_alignment(
                model, ids_t, lab_t, params=traced, norm_directions=norm_directions, seed=self.cfg.trace_seed))

        def reference() -> torch.Tensor | None:
            ref = self.reference_log_probs(model, parts, ids_t, lab_t)
            return None if ref is None else ref[None]

        producers = {
            "entropy": lambda: stats["entropy"][None],
            "ref_distribution": lambda kl_direction: torch.zeros_like(lp),
            "topk_entropy": lambda topk_entropy_k: once(("topk", topk_entropy_k), lambda: topk(topk_entropy_k)),
            "ref_log_probs": lambda: once("ref", reference),
            "token_alignment": lambda norm_directions: once(("align", norm_directions),
                                                            lambda: alignment(norm_directions)),
        }
        base = TokenInputs(lp, mask, entropy=stats["entropy"][None])
        out = {}
        for key, (scheme, params) in self.traced_schemes().items():
            tok = base.replace(**produce_needs(scheme.needs, params, producers, head=True))
            if tok.missing(scheme.needs):  # a need this trace cannot produce (no PEFT reference, no alignment)
                out[key] = torch.full_like(stats["log_probs"], math.nan)
                continue
            out[key] = loss_from_log_probs(tok, scheme, params=params).weights[0].cpu()
        return out

    @staticmethod
    def reference_log_probs(model, parts, ids_t, lab_t) -> torch.Tensor | None:
        """log p_ref(y_t) `(T,)` from the model with its LoRA adapter disabled; None without PEFT."""
        if not hasattr(model, "disable_adapter"):
            return None
        with torch.no_grad(), model.disable_adapter():
            return token_stats(parts.head(parts.hidden(ids_t))[0], lab_t[0])["log_probs"].cpu()

    def metadata(self, model: nn.Module, seq_meta: list[dict]) -> dict:
        cfg = self.cfg
        proj = self._projector
        n_params = sum(m.weight.numel() for m in self._modules.values())
        schemes = self.traced_schemes()
        k = cfg.trace_norm_directions
        return {
            "mode": self.mode,
            "layers": list(self._modules),
            "quantities": self.quantities,
            "projection": {"kind": proj.kind, "dims": proj.dims(self._modules), "seed": cfg.trace_seed,
                           "factor": cfg.trace_proj_factor, "max_dim": cfg.trace_proj_dim},
            "scheme_params": {k: v for _, params in schemes.values() for k, v in params.items()},
            "schemes": {key: {"mode": s.name, "description": s.description, "source": s.source, "params": params,
                              "affects": s.affects, "affects_label": s.affects_label}
                        for key, (s, params) in schemes.items()},
            "sequences": seq_meta,
            "tracer": {
                "loss": "sum of CE over the targets of the sequence (G = gradient of that sum)",
                "pos_index": "position t (layer input x_t, output gradient dy_t), every position incl. the prompt; "
                             "alignment NaN where the position has no gradient (the last one)",
                "params": "weights of the traced modules", "n_params": int(n_params),
                "alignment_method": cfg.trace_alignment_method, "token_norms": cfg.trace_token_norms,
                "num_directions": k if cfg.trace_token_norms == "projection" or cfg.trace_store_projections else None,
                "norm_sq_residual_rel_std": math.sqrt(2.0 / k) if cfg.trace_token_norms == "projection" else 0.0,
                "scheme_stat_scope": "the traced sequence",
                "attn_implementation": "eager", "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "max_length": cfg.trace_max_length, "sequence_selection": cfg.trace_sequence_selection,
                "config": asdict(cfg),
            },
        }

    def _check_fp16(self, arrays: dict, step: int) -> None:
        if self._fp16_warned:
            return
        for k, v in arrays.items():
            if v.is_floating_point() and not k.endswith("G_norm"):
                finite = v[torch.isfinite(v)]
                if finite.numel() and finite.abs().max() > FP16_MAX:
                    warnings.warn(f"trace step {step}: {k} exceeds the float16 range and is stored as inf",
                                  stacklevel=2)
                    self._fp16_warned = True
                    return


def build_trace_callback(args, train_dataset, tokenizer) -> TokenGradTraceCallback | None:
    """The tracer of a `tokensft train` run, or None when `args.trace_every_n_steps` is 0.

    Reads `args.trace_*`, `args.output_dir`, `args.mode` and every declared scheme parameter that `args` has (its
    flags and `args.scheme_args`), so every registered scheme is overlaid with the run's parameters.
    """
    if int(getattr(args, "trace_every_n_steps", 0) or 0) <= 0:
        return None
    from ..losses import all_params

    scheme_kwargs = {name: getattr(args, name) for name in all_params() if hasattr(args, name)}
    scheme_kwargs.update(getattr(args, "scheme_args", None) or {})
    return TokenGradTraceCallback(args, train_dataset, tokenizer, output_dir=args.output_dir,
                                  mode=getattr(args, "mode", "sft"), scheme_kwargs=scheme_kwargs)
