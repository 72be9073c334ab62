"""On-disk schema of per-token gradient traces: one safetensors + one JSON file per trace step, and a manifest.

Depends on nothing of tokensft but `tokensft.io` and `tokensft.tokens` (the analysis and the visualizer read traces
through this module only), and, on first use of the affected-token rule (`affected`, `scheme_rules`), on
`tokensft.losses.schemes`, where that rule is declared and compared.

Layout of a run directory::

    RUN_DIR/traces/manifest.jsonl             one JSON object a line: {"step", "file", "n_sequences", "time"}
    RUN_DIR/traces/step_00000010.safetensors   arrays (float16 values, int32 ids, uint8 flags)
    RUN_DIR/traces/step_00000010.json          metadata (see `TraceStep.meta`)

Metadata keys: `schema_version` (int), `step` (optimizer step), `mode` (loss mode of the run), `layers` (traced
module names, in the order of the `L` axis below), `quantities` (subset of `["per_position", "per_token_loss"]`),
`projection` (dict: kind, dims, seed), `scheme_params` (dict), `schemes` (dict: trace key of each `weight.<key>`
array -> `{"mode", "description", "source", "params", "affects", "affects_label"}`, the scheme's declared
affected-token rule; read with `scheme_rules`), and `sequences`: a list of
`{"index", "example_index", "tokens": [decoded piece per token], "categories": [category per token], "length": T}`.
Optional key `tracer` (dict, written by `tokensft.tracing.callback`): how the values were computed (`loss` reduction,
`pos_index`, `params`, `n_params`, `alignment_method`, `token_norms`, `num_directions`, `norm_sq_residual_rel_std`,
`attn_implementation`, `dtype`, `max_length`, `sequence_selection`, `config`); see docs/tracing.md.

Arrays of sequence `i` (prefix `s{i}.`; `T` = its length in tokens, `L` = number of traced layers, `k` = projection
dims). Token `t` is `input_ids[t]`; its loss comes from the logits at position `t-1`, so `t = 0` is never a target.
Values of tokens that are not supervised targets are NaN.

| key | shape | dtype | meaning |
| --- | --- | --- | --- |
| `token_ids` | (T,) | int32 | input ids |
| `is_completion` | (T,) | uint8 | 1 where the token is a supervised target (label != -100) |
| `loss` / `p` / `entropy` | (T,) | float16 | CE loss -log p(y_t) (nats), p(y_t), entropy of the predictive distribution (nats) |
| `weight.<key>` | (T,) | float16 | weight each traced scheme would give the token (`dft`, `topk`, `antiop`, `lr`, `sft-pk`, `rho1`, `eaft`, user schemes; NaN when a needed reference is missing) |
| `pos.dot` / `pos.norm` / `pos.alignment` | (T,) | float16 | per-position contribution g_t = dy_t (x) x_t summed over layers: <g_t, G>, ||g_t||, cosine with G = sum_s g_s |
| `pos.layer.dot` / `.norm` / `.alignment` | (L, T) | float16 | the same per traced layer |
| `pos.layer.G_norm` | (L,) | float32 | ||G|| per layer |
| `pos.G_norm` | () or (1,) | float32 | ||G|| over all traced layers |
| `pos.{l}.x_proj` / `pos.{l}.dy_proj` | (T, k) | float16 | optional raw projections of layer l (index into `layers`) |
| `tokloss.dot` / `.norm` / `.alignment` | (T,) | float16 | per-token-loss gradient: <grad l_t, G>, ||grad l_t||, cosine, G = sum_t grad l_t (traced params) |
| `tokloss.G_norm` | () or (1,) | float32 | ||G|| |
| `tokloss.grad_proj` | (T, k) | float16 | optional random projection of grad l_t (for clustering) |

The `pos.*` arrays are the exception to the NaN rule: they hold a value at every position t, prompt positions
included (those carry gradient through attention and are part of G; filter with `is_completion` for targets only);
`pos.alignment` is NaN only where a position has no gradient (e.g. the last one).

Files are written atomically (temporary file + `os.replace`) and the manifest line is appended last, so a crash
leaves at most an orphan file that readers ignore. Readers skip torn or unreadable files with a warning.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import append_jsonl, atomic_write, cut_to_last_line
from ..tokens import CATEGORIES, categorize_token  # noqa: F401 - part of the schema's API

SCHEMA_VERSION = 1
TRACE_DIR = "traces"
MANIFEST = "manifest.jsonl"


def scheme_rules(meta: dict | None, keys=()) -> dict[str, dict]:
    """Affected-token rule of each traced scheme: `trace_key -> {"name", "affects", "label"}` (`affects`: `"zero"`,
    `"below_one"` or None, see `tokensft.losses.schemes.AFFECTS`).

    Read from the trace metadata's `schemes` entries; a key the metadata does not describe (traces written before the
    tracer recorded the rule, or only in `keys`: the `weight.<key>` arrays seen) falls back to the rule the registered
    scheme of that trace key declares, then to `{"name": key, "affects": "below_one", "label": "<key> down-weights"}`.
    """
    from tokensft.losses.schemes import traced_rules

    declared = (meta or {}).get("schemes") or {}
    registry = traced_rules()
    out = {}
    for key in [*declared, *(k for k in keys if k not in declared)]:
        d = declared.get(key) or {}
        if "affects" in d:
            name = d.get("mode", key)
            out[key] = {"name": name, "affects": d["affects"], "label": d.get("affects_label") or f"{name} down-weights"}
        else:
            out[key] = dict(registry.get(key) or {"name": d.get("mode", key), "affects": "below_one",
                                                   "label": f"{d.get('mode', key)} down-weights"})
    return out


def affected(weights, rule: str) -> np.ndarray:
    """Bool mask of the tokens a scheme with affected-token rule `rule` affects (`tokensft.losses.schemes.affected`,
    the one place the comparison and its float16 tolerance live); False where the weight is NaN."""
    from tokensft.losses.schemes import affected as _affected

    return _affected(np.asarray(weights, dtype=np.float32), rule)


def step_stem(step: int) -> str:
    """File stem of a trace step: `step_00000010`."""
    return f"step_{step:08d}"


@dataclass
class TraceSequence:
    """One traced sequence: metadata dict and arrays (float arrays converted to float32 numpy)."""

    meta: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def get(self, key: str, default=None):
        return self.arrays.get(key, default)

    @property
    def tokens(self) -> list[str]:
        return self.meta["tokens"]

    @property
    def categories(self) -> list[str]:
        return self.meta["categories"]


@dataclass
class TraceStep:
    """One trace step as read from disk."""

    step: int
    meta: dict
    sequences: list[TraceSequence]
    path: Path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def _to_storable(key: str, v) -> np.ndarray:
    a = v.detach().cpu().float().numpy() if hasattr(v, "detach") and v.is_floating_point() else (
        v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
    if a.dtype.kind == "f":
        return a.astype(np.float32).reshape(-1) if key.endswith("G_norm") else a.astype(np.float16)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if a.dtype.kind in "iu" and a.dtype != np.uint8:
        return a.astype(np.int32)
    return a


def write_trace_step(run_dir: str | os.PathLike, step: int, meta: dict, arrays: dict) -> Path:
    """Write one trace step (atomically) and append it to the manifest, unless that step is already recorded.

    Args:
        run_dir: the training output directory; traces go to `run_dir/traces/`.
        step: optimizer step (global_step) of the trace.
        meta: JSON-serialisable metadata (see module docstring); `step` and `schema_version` are filled in.
        arrays: name -> tensor/ndarray (see module docstring). Floating arrays with more than one element are stored
            as float16 (`*G_norm` scalars as float32), integers as int32, booleans as uint8.

    Returns:
        Path of the safetensors file.
    """
    from safetensors.numpy import save

    tdir = Path(run_dir) / TRACE_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    remove_orphan_temporaries(tdir)
    cut_to_last_line(tdir / MANIFEST)  # a line torn by a killed append: dropped, that step is written again
    done = {e["step"] for e in read_manifest(run_dir)}
    stem = step_stem(step)
    st_path = tdir / f"{stem}.safetensors"
    if step in done:
        return st_path
    meta = {**meta, "step": int(step), "schema_version": SCHEMA_VERSION}
    tensors = {k: np.ascontiguousarray(_to_storable(k, v)) for k, v in arrays.items()}
    _atomic_write_bytes(st_path, save(tensors, metadata={"schema_version": str(SCHEMA_VERSION)}))
    _atomic_write_bytes(tdir / f"{stem}.json", json.dumps(meta, ensure_ascii=False).encode())
    entry = {"step": int(step), "file": stem, "n_sequences": len(meta.get("sequences", [])), "time": time.time()}
    append_jsonl(tdir / MANIFEST, [entry])  # a torn last line (a killed append) is cut first
    return st_path


def remove_orphan_temporaries(trace_dir: str | os.PathLike, *, older_than_s: float = 60.0) -> list[Path]:
    """Delete the `*.tmp` files that killed trace writes left in `trace_dir` (an atomic write's temporary file is
    renamed within milliseconds, so one older than `older_than_s` seconds is an orphan). Returns the paths removed."""
    removed = []
    now = time.time()
    for tmp in Path(trace_dir).glob("*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass
    return removed


def read_manifest(run_dir: str | os.PathLike) -> list[dict]:
    """Entries of `traces/manifest.jsonl`; a torn last line is skipped with a warning. Missing manifest -> []."""
    path = Path(run_dir) / TRACE_DIR / MANIFEST
    if not path.exists():
        return []
    out, seen = [], set()
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{i}: unreadable manifest line skipped", stacklevel=2)
            continue
        if not (isinstance(e, dict) and isinstance(e.get("step"), int) and isinstance(e.get("file"), str)):
            warnings.warn(f"{path}:{i}: manifest line is not an entry {{\"step\": int, \"file\": str, ...}}; "
                          "skipped", stacklevel=2)
            continue
        if e["step"] not in seen:
            seen.add(e["step"])
            out.append(e)
    return out


def read_trace_step(path: str | os.PathLike) -> TraceStep:
    """Read one trace step from its `.safetensors` path (the `.json` beside it holds the metadata).

    Raises:
        ValueError: torn or unreadable file, or metadata that does not match the arrays.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        raw = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
        raise ValueError(f"{path}: unreadable trace file ({type(e).__name__}: {e})") from e
    seqs = []
    for s in meta.get("sequences", []):
        prefix = f"s{s['index']}."
        arrays = {}
        for k, v in raw.items():
            if k.startswith(prefix):
                arrays[k[len(prefix) :]] = v.astype(np.float32) if v.dtype == np.float16 else v
        if "token_ids" not in arrays or len(arrays["token_ids"]) != s["length"]:
            raise ValueError(f"{path}: sequence {s['index']} has no token_ids of length {s['length']}")
        seqs.append(TraceSequence(meta=s, arrays=arrays))
    return TraceStep(step=int(meta["step"]), meta=meta, sequences=seqs, path=path)


def iter_trace_steps(run_dir: str | os.PathLike, *, progress: bool = False) -> Iterator[TraceStep]:
    """Yield the trace steps of a run in step order, skipping torn/unreadable files with a warning.

    Files listed in the manifest are read; files present on disk but not in the manifest (a crash between the file
    and the manifest line) are read too when they parse, so nothing that was fully written is lost.
    """
    tdir = Path(run_dir) / TRACE_DIR
    if not tdir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no {TRACE_DIR}/ directory (train with --trace_every_n_steps N)")
    stems = {e["file"] for e in read_manifest(run_dir)} | {p.stem for p in tdir.glob("step_*.safetensors")}
    paths = sorted(tdir / f"{s}.safetensors" for s in stems)
    it = paths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(paths, desc=f"reading traces ({Path(run_dir).name})", unit="file")
    for p in it:
        try:
            yield read_trace_step(p)
        except ValueError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)


