"""Read a run's traces into flat per-token arrays plus streamed per-layer accumulators.

Everything comes from the trace files (`tokensft.tracing.schema`); no model or tokenizer is loaded. Token-level
arrays (one entry per token of every traced sequence of every trace step) are small enough to keep in memory
(~100 bytes a token); the per-layer arrays `pos.layer.*` (L, T) are not kept but reduced on the fly into
per-module sums, per (module, position bin) sums and per-step ||G_l||.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokensft.tokens import CATEGORIES, categorize_token, display_piece, refine_categories  # noqa: F401
from tokensft.tracing.schema import iter_trace_steps, scheme_rules

QUANTITIES = ("pos", "tokloss")
QUANTITY_LABELS = {"pos": "per-position", "tokloss": "per-token-loss"}
N_POS_BINS = 16  # log2 position bins: {0}, {1}, {2,3}, {4..7}, ..., {2^14 .. 2^15 - 1} and beyond

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_MODULE_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
    "down_proj": "down", "query": "q", "key": "k", "value": "v", "qkv_proj": "qkv", "c_attn": "qkv",
    "c_proj": "o", "c_fc": "up", "fc1": "up", "fc2": "down", "out_proj": "o", "dense": "o",
}  # fmt: skip


def parse_module_name(name: str) -> tuple[int | None, str, str]:
    """Layer index, module type and LoRA part of a traced module name.

    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.default` -> (3, "q", "lora_A");
    `model.layers.0.mlp.down_proj` -> (0, "down", "base"). Unknown module kinds keep their own name
    component; a name without a layer index gives None.
    """
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    parts = [p for p in name.split(".") if p and p != "default"]
    lora = next((p for p in parts if p in ("lora_A", "lora_B")), "base")
    kind = next((_MODULE_TYPES[p] for p in reversed(parts) if p in _MODULE_TYPES), None)
    if kind is None:
        rest = [p for p in parts if p not in ("lora_A", "lora_B") and not p.isdigit()]
        kind = rest[-1] if rest else name
    return layer, kind, lora


def pos_bin(rpos: np.ndarray) -> np.ndarray:
    """Log2 bin of a position within the response: 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3, ...; -1 (prompt) -> -1."""
    r = np.asarray(rpos, dtype=np.int64)
    out = np.full(r.shape, -1, dtype=np.int64)
    ok = r >= 0
    b = np.zeros(r.shape, dtype=np.int64)
    pos = r > 0
    b[pos] = np.floor(np.log2(r[pos])).astype(np.int64) + 1
    out[ok] = np.minimum(b[ok], N_POS_BINS - 1)
    return out


def pos_bin_labels(n: int = N_POS_BINS) -> list[str]:
    """Labels of the log2 position bins: '0', '1', '2-3', '4-7', ..."""
    labels = []
    for b in range(n):
        if b <= 1:
            labels.append(str(b))
        else:
            lo, hi = 2 ** (b - 1), 2**b - 1
            labels.append(f"{lo}-{hi}" if b < n - 1 else f"{lo}+")
    return labels


@dataclass
class LayerStats:
    """Per traced module sums over completion tokens of all steps (from `pos.layer.*`)."""

    names: list[str] = field(default_factory=list)
    sum_align: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    sum_norm: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bin_sum_align: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N_POS_BINS,)
    bin_count: dict[str, np.ndarray] = field(default_factory=dict)
    # name -> one value per traced sequence: ||G_l|| and its share ||G_l||^2 / sum_l' ||G_l'||^2 of the squared norm
    g_norm: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    g_share: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class RunData:
    """A run's traces, flattened. Token arrays are (N,), N = tokens of all traced sequences of all steps.

    Attributes:
        step, seq, t, rpos: optimizer step, global sequence id (index into `tokens`/`seq_info`), position in the
            sequence, position among the sequence's completion tokens (-1 for prompt tokens), int64.
        completion: bool, supervised target (`is_completion == 1`).
        category: int64 index into `CATEGORIES`.
        loss, p, entropy: float32 (nats; NaN on prompt tokens).
        weight: scheme -> (N,) float32 weight the scheme gives (missing schemes absent).
        norm, alignment: quantity ('pos', 'tokloss') -> (N,) float32 ||g_t|| and cos(g_t, G); quantities the trace
            lacks are absent.
        g_norm: quantity -> {step: mean over the step's sequences of ||G||}.
        tokens: decoded pieces per sequence; seq_info: (step, example_index) per sequence.
        layers: per-module statistics of `pos.layer.*`, or None when no step has them.
        steps: sorted trace steps read; mode: the run's loss mode (from the metadata).
        schemes: the metadata's `schemes` entries (trace key -> mode, params, declared affected-token rule).
    """

    run_dir: Path
    name: str
    step: np.ndarray
    seq: np.ndarray
    t: np.ndarray
    rpos: np.ndarray
    completion: np.ndarray
    category: np.ndarray
    loss: np.ndarray
    p: np.ndarray
    entropy: np.ndarray
    weight: dict[str, np.ndarray]
    norm: dict[str, np.ndarray]
    alignment: dict[str, np.ndarray]
    g_norm: dict[str, dict[int, float]]
    tokens: list[list[str]]
    seq_info: list[tuple[int, int]]
    layers: LayerStats | None
    steps: list[int]
    mode: str | None
    scheme_params: dict
    schemes: dict = field(default_factory=dict)
    _step_idx: dict[int, np.ndarray] | None = field(default=None, repr=False)

    def step_indices(self, mask: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """step -> indices of its tokens (restricted to `mask` (N,) bool when given), for every step in `steps`."""
        if self._step_idx is None:
            order = np.argsort(self.step, kind="stable")
            groups = np.split(order, np.flatnonzero(np.diff(self.step[order])) + 1) if order.size else []
            self._step_idx = {int(self.step[g[0]]): g for g in groups if g.size}
        empty = np.zeros(0, dtype=np.int64)
        out = {s: self._step_idx.get(s, empty) for s in self.steps}
        return out if mask is None else {s: idx[mask[idx]] for s, idx in out.items()}

    @property
    def scheme_rules(self) -> dict[str, dict]:
        """Affected-token rule of each traced scheme, `trace_key -> {"name", "affects", "label"}`, from the trace
        metadata (`tokensft.tracing.schema.scheme_rules`: old traces fall back to the registry, then `below_one`);
        schemes declared in the metadata first, then any other recorded `weight.<key>`."""
        return scheme_rules({"schemes": self.schemes}, self.weight)

    @property
    def quantities(self) -> list[str]:
        """Quantities present in the trace, in `QUANTITIES` order."""
        return [q for q in QUANTITIES if q in self.alignment]

    @property
    def n_tokens(self) -> int:
        return int(self.step.size)


def _f32(a, n: int) -> np.ndarray:
    if a is None:
        return np.full(n, np.nan, dtype=np.float32)
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    if a.size != n:
        raise ValueError(f"array of length {a.size}, expected {n}")
    return a


def load_run(run_dir: str | os.PathLike, *, name: str | None = None, progress: bool = True) -> RunData:
    """Read all readable trace steps of `run_dir` (see `tokensft.tracing.schema`) into a `RunData`.

    Torn or unreadable trace files are skipped with a warning (by `iter_trace_steps`).

    Raises:
        FileNotFoundError: no `traces/` directory.
        ValueError: no readable trace step, or a sequence whose arrays do not match its length (names the file).
    """
    run_dir = Path(run_dir)
    cols: dict[str, list[np.ndarray]] = defaultdict(list)
    weight: dict[str, list[np.ndarray]] = defaultdict(list)
    norm: dict[str, list[np.ndarray]] = defaultdict(list)
    align: dict[str, list[np.ndarray]] = defaultdict(list)
    g_norm_seq: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    tokens: list[list[str]] = []
    seq_info: list[tuple[int, int]] = []
    layers = LayerStats()
    have_layers = False
    steps: list[int] = []
    mode, scheme_params, schemes = None, {}, {}
    n_total = 0
    cat_index = {c: i for i, c in enumerate(CATEGORIES)}

    for ts in iter_trace_steps(run_dir, progress=progress):
        steps.append(ts.step)
        mode = ts.meta.get("mode", mode)
        scheme_params = ts.meta.get("scheme_params", scheme_params) or {}
        schemes.update(ts.meta.get("schemes") or {})
        names = list(ts.meta.get("layers", []))
        for seq in ts.sequences:
            T = int(seq.meta["length"])
            where = f"{ts.path}: sequence {seq.meta.get('index')}"
            try:
                comp = np.asarray(seq["is_completion"], dtype=bool).reshape(-1) if "is_completion" in seq.arrays \
                    else np.isfinite(_f32(seq.get("loss"), T))
                if comp.size != T:
                    raise ValueError(f"is_completion of length {comp.size}, expected {T}")
                pieces = list(seq.meta.get("tokens") or [""] * T)
                cats = list(seq.meta.get("categories") or [categorize_token(p) for p in pieces])
                if len(pieces) != T or len(cats) != T:
                    raise ValueError(f"{len(pieces)} tokens / {len(cats)} categories in the metadata, expected {T}")
                cats = refine_categories(pieces, cats)
                rpos = np.where(comp, np.cumsum(comp) - 1, -1)
                sid = len(tokens)
                cols["step"].append(np.full(T, ts.step, dtype=np.int64))
                cols["seq"].append(np.full(T, sid, dtype=np.int64))
                cols["t"].append(np.arange(T, dtype=np.int64))
                cols["rpos"].append(rpos.astype(np.int64))
                cols["completion"].append(comp)
                cols["category"].append(np.array([cat_index.get(c, cat_index["punctuation"]) for c in cats],
                                                 dtype=np.int64))
                for k in ("loss", "p", "entropy"):
                    cols[k].append(_f32(seq.get(k), T))
                for key in seq.arrays:  # the built-ins and every other scheme the tracer overlaid
                    if key.startswith("weight."):
                        weight[key[len("weight."):]].append((n_total, _f32(seq[key], T)))
                for q in QUANTITIES:
                    if f"{q}.alignment" in seq.arrays:
                        align[q].append((n_total, _f32(seq[f"{q}.alignment"], T)))
                        norm[q].append((n_total, _f32(seq.get(f"{q}.norm"), T)))
                        if f"{q}.G_norm" in seq.arrays:
                            g_norm_seq[q][ts.step].append(float(np.asarray(seq[f"{q}.G_norm"]).reshape(-1)[0]))
                if "pos.layer.alignment" in seq.arrays and names:
                    have_layers = True
                    _accumulate_layers(layers, names, seq, comp, rpos, T)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: {e}") from e
            tokens.append(pieces)
            seq_info.append((ts.step, int(seq.meta.get("example_index", -1))))
            n_total += T

    if not steps:
        raise ValueError(f"{run_dir}: no readable trace step in {run_dir / 'traces'}")

    def cat(key, dtype):
        return np.concatenate(cols[key]).astype(dtype) if cols[key] else np.zeros(0, dtype)

    def scatter(parts):  # arrays that only some sequences carry: NaN elsewhere
        out = np.full(n_total, np.nan, dtype=np.float32)
        for start, a in parts:
            out[start : start + a.size] = a
        return out

    return RunData(
        run_dir=run_dir,
        name=name or run_dir.name,
        step=cat("step", np.int64), seq=cat("seq", np.int64), t=cat("t", np.int64), rpos=cat("rpos", np.int64),
        completion=cat("completion", bool), category=cat("category", np.int64),
        loss=cat("loss", np.float32), p=cat("p", np.float32), entropy=cat("entropy", np.float32),
        weight={s: scatter(v) for s, v in weight.items()},
        norm={q: scatter(v) for q, v in norm.items()},
        alignment={q: scatter(v) for q, v in align.items()},
        g_norm={q: {s: float(np.mean(v)) for s, v in d.items()} for q, d in g_norm_seq.items()},
        tokens=tokens, seq_info=seq_info,
        layers=layers if have_layers else None,
        steps=sorted(set(steps)), mode=mode, scheme_params=scheme_params, schemes=schemes,
    )  # fmt: skip


def _accumulate_layers(ls: LayerStats, names, seq, comp, rpos, T) -> None:
    la = np.asarray(seq["pos.layer.alignment"], dtype=np.float64)
    ln = np.asarray(seq.get("pos.layer.norm", np.full_like(la, np.nan)), dtype=np.float64)
    if la.shape != (len(names), T) or ln.shape != (len(names), T):
        raise ValueError(f"pos.layer.alignment/norm of shape {la.shape}/{ln.shape}, expected ({len(names)}, {T})")
    gl = seq.get("pos.layer.G_norm")
    bins = pos_bin(rpos)
    ok = comp[None, :] & np.isfinite(la)  # (L, T) completion tokens with a value
    la0 = np.where(ok, la, 0.0)
    ln0 = np.where(ok & np.isfinite(ln), ln, 0.0)
    onehot = np.zeros((T, N_POS_BINS))  # (T, nb): position bin of each token (prompt tokens are masked by `ok`)
    onehot[np.arange(T), np.clip(bins, 0, None)] = 1.0
    sum_align, sum_norm, count = la0.sum(1), ln0.sum(1), ok.sum(1)  # (L,)
    bin_sum, bin_cnt = la0 @ onehot, ok.astype(np.float64) @ onehot  # (L, nb)
    for i, nm in enumerate(names):
        if nm not in ls.bin_sum_align:
            ls.names.append(nm)
            ls.bin_sum_align[nm] = np.zeros(N_POS_BINS)
            ls.bin_count[nm] = np.zeros(N_POS_BINS, dtype=np.int64)
        ls.sum_align[nm] += float(sum_align[i])
        ls.sum_norm[nm] += float(sum_norm[i])
        ls.count[nm] += int(count[i])
        ls.bin_sum_align[nm] += bin_sum[i]
        ls.bin_count[nm] += np.rint(bin_cnt[i]).astype(np.int64)
    if gl is not None and np.asarray(gl).size == len(names):
        g = np.asarray(gl, dtype=np.float64).reshape(-1)
        total = float(np.sum(g**2))
        for i, nm in enumerate(names):
            ls.g_norm[nm].append(float(g[i]))
            ls.g_share[nm].append(float(g[i] ** 2 / total) if total > 0 else np.nan)
