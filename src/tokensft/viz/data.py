"""Read-only access to the traces of the run directories given to `tokensft viz`, and per-token values from them.

Everything the visualizer reads goes through `RunStore`, which refuses any path outside the run directories it was
given (`resolve_inside`). Traces are read with `tokensft.tracing.schema` (safetensors + JSON); nothing is unpickled.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokensft.tokens import display_piece  # noqa: F401 - re-exported for the renderer
from tokensft.tracing.schema import (
    CATEGORIES,
    MANIFEST,
    TRACE_DIR,
    TraceSequence,
    TraceStep,
    affected,
    read_manifest,
    read_trace_step,
    scheme_rules,
)

QUANTITIES: dict[str, str] = {"pos": "per-position", "tokloss": "per-token-loss"}
"""Short name -> label of the two traced gradient quantities (array prefixes `pos.` and `tokloss.`)."""
_QUANTITY_META = {"per_position": "pos", "per_token_loss": "tokloss"}

METRICS: dict[str, str] = {
    "alignment": "alignment cos(g_t, G)",
    "dot": "dot ⟨g_t, G⟩",
    "norm": "gradient magnitude ‖g_t‖",
    "loss": "CE loss (nats)",
    "p": "p_t",
    "entropy": "entropy (nats)",
    "weight": "scheme weight",
}
"""Metric name -> label. `alignment`, `dot`, `norm` depend on the quantity (and layer); the others do not."""
GRAD_METRICS = ("alignment", "dot", "norm")

_SCHEME_KEY = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


def sequence_schemes(seq: TraceSequence) -> list[str]:
    """Keys of every scheme whose weights this sequence records (`weight.<key>`), in array order."""
    return [k[len("weight."):] for k in seq.arrays if k.startswith("weight.") and _SCHEME_KEY.match(k[7:])]


def step_scheme_rules(step: TraceStep | None) -> dict[str, dict]:
    """Trace key -> `{"name", "affects", "label"}` of every scheme of a step: those its metadata declares (in the
    tracer's order), then any other recorded `weight.<key>` (`tokensft.tracing.schema.scheme_rules`: a trace written
    before the tracer recorded the rule falls back to the registry's declaration, then to `below_one`)."""
    if step is None:
        return {}
    keys = [k for seq in step.sequences for k in sequence_schemes(seq)]
    rules = scheme_rules(step.meta, list(dict.fromkeys(keys)))
    return {k: r for k, r in rules.items() if _SCHEME_KEY.match(k)}


def scheme_name(key: str, rules: dict[str, dict] | None = None) -> str:
    """Loss mode of a `weight.<key>` array: its `name` in `rules` (`step_scheme_rules`), else `key` itself."""
    return ((rules or {}).get(key) or {}).get("name", key)

ALL_LAYERS = "all"


class MissingDataError(ValueError):
    """A trace lacks the array a view needs (e.g. a quantity that was not traced)."""


class PathRefusedError(PermissionError):
    """A path outside the run directories given to the visualizer."""


# ----------------------------------------------------------------------------------------------------------------
# Path guard


def resolve_inside(path: str | os.PathLike, roots: list[str | os.PathLike], *, base: str | os.PathLike | None = None) -> Path:
    """Resolve `path` (symlinks and `..` included) and return it if it lies inside one of `roots`.

    Args:
        path: a path as typed by a user; relative paths are taken relative to `base` (default: the current
            directory).
        roots: the allowed directories (resolved the same way); a root itself is inside.
        base: directory that relative paths are relative to.

    Returns:
        The resolved absolute path (it need not exist).

    Raises:
        ValueError: empty path or a path with a NUL byte.
        PathRefusedError: the resolved path is outside every root (e.g. `RUN/../other`, a symlink out of a run,
            or `/tmp/run2` when only `/tmp/run` is allowed).
    """
    s = os.fspath(path)
    if not s.strip():
        raise ValueError("empty path")
    if "\x00" in s:
        raise ValueError("path contains a NUL byte")
    p = Path(s.strip()).expanduser()
    if not p.is_absolute():
        p = Path(base if base is not None else os.getcwd()) / p
    real = Path(os.path.realpath(p))
    real_roots = [Path(os.path.realpath(Path(r).expanduser())) for r in roots]
    for r in real_roots:
        if real == r or r in real.parents:
            return real
    raise PathRefusedError(
        f"refused: {s} is outside the run directories given to `tokensft viz` "
        f"({', '.join(str(r) for r in real_roots) or 'none'})"
    )


def is_run_dir(path: Path) -> bool:
    """True when `path/traces/` holds a manifest or at least one trace step file."""
    t = path / TRACE_DIR
    return t.is_dir() and ((t / MANIFEST).exists() or any(t.glob("step_*.safetensors")))


def discover_runs(root: Path, max_depth: int = 2) -> list[Path]:
    """Run directories at or below `root` (to `max_depth` levels): `root` itself when it has traces, else its
    sub-directories that do (so `tokensft viz runs/` finds `runs/a`, `runs/b`). Symlinked directories are skipped."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    if max_depth <= 0 or not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.is_symlink() and child.name != TRACE_DIR:
            found.extend(discover_runs(child, max_depth - 1))
    return found


_STEP_RE = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# Store


@dataclass
class Run:
    """A run directory known to the store: its resolved path and a short unique label."""

    path: Path
    label: str


class RunStore:
    """The run directories given to the visualizer, with cached, path-checked reads of their trace steps.

    Args:
        run_dirs: directories given on the command line; each is either a run directory (has `traces/`) or a
            directory whose sub-directories are (searched two levels deep).
        cache_size: trace steps kept in memory (least recently used are dropped).

    Raises:
        FileNotFoundError: a directory does not exist, or no run directory with traces was found in any of them.
    """

    def __init__(self, run_dirs: list[str | os.PathLike], cache_size: int = 32):
        self.roots: list[Path] = []
        for d in run_dirs:
            p = Path(os.path.realpath(Path(d).expanduser()))
            if not p.is_dir():
                raise FileNotFoundError(f"{d}: not a directory")
            self.roots.append(p)
        self.runs: dict[str, Run] = {}
        for r in self.roots:
            for run in discover_runs(r):
                self._register(run)
        if not self.runs:
            raise FileNotFoundError(
                f"no run directory with a {TRACE_DIR}/ folder found in {', '.join(map(str, run_dirs))} "
                "(train with --trace_every_n_steps N)"
            )
        self._cache: OrderedDict[tuple[str, float], TraceStep] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._summary_cache: dict[tuple, dict] = {}

    # -- paths ---------------------------------------------------------------------------------------------------
    def check(self, path: str | os.PathLike) -> Path:
        """`resolve_inside(path, self.roots)`: the resolved path, or `PathRefusedError`."""
        return resolve_inside(path, self.roots)

    def _register(self, path: Path) -> Run:
        key = str(path)
        if key in self.runs:
            return self.runs[key]
        labels = {r.label for r in self.runs.values()}
        label = path.name or key
        if label in labels:
            label = f"{path.parent.name}/{path.name}"
        n = 2
        base = label
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        run = Run(path=path, label=label)
        self.runs[key] = run
        return run

    def open_path(self, path: str) -> tuple[Run, int | None]:
        """Add a run typed into the UI: a run directory, its `traces/` folder or one trace step file inside the
        given roots. Returns the run and the step of the file (None for a directory).

        Raises:
            PathRefusedError: outside the given run directories.
            FileNotFoundError: inside them but neither a run directory nor a trace step file.
        """
        p = self.check(path)
        step = None
        if p.is_file() and p.suffix in (".safetensors", ".json") and _STEP_RE.match(p.stem):
            step = int(_STEP_RE.match(p.stem).group(1))
            p = p.parent.parent if p.parent.name == TRACE_DIR else p.parent
        elif p.is_dir() and p.name == TRACE_DIR:
            p = p.parent
        if not p.is_dir() or not is_run_dir(p):
            raise FileNotFoundError(f"{path}: not a run directory with a {TRACE_DIR}/ folder, nor a trace step file")
        return self._register(p), step

    def run(self, key: str) -> Run:
        """The run registered under `key` (its resolved path as a string).

        Raises:
            KeyError: unknown run (only runs found in, or opened inside, the given directories are known).
        """
        try:
            return self.runs[key]
        except KeyError:
            raise KeyError(f"unknown run {key!r}; open it with the path box first") from None

    def choices(self) -> list[tuple[str, str]]:
        """(label, key) pairs of the known runs, for a dropdown."""
        return [(r.label, k) for k, r in self.runs.items()]

    # -- steps ---------------------------------------------------------------------------------------------------
    def steps(self, key: str) -> list[int]:
        """Trace steps of a run, ascending: those in its manifest plus step files on disk (re-read each call, so
        steps written by a running training appear)."""
        run = self.run(key)
        tdir = self.check(run.path / TRACE_DIR)
        found = {int(e["step"]) for e in read_manifest(run.path)}
        for f in tdir.glob("step_*.safetensors"):
            m = _STEP_RE.match(f.stem)
            if m:
                found.add(int(m.group(1)))
        return sorted(found)

    def step_path(self, key: str, step: int) -> Path:
        """Path of the safetensors file of `step` (checked to be inside the given directories)."""
        run = self.run(key)
        return self.check(run.path / TRACE_DIR / f"step_{int(step):08d}.safetensors")

    def load(self, key: str, step: int) -> TraceStep:
        """The trace step `step` of run `key` (cached; re-read when the file changes).

        Raises:
            FileNotFoundError: no such step file.
            ValueError: the file is torn or unreadable.
        """
        path = self.step_path(key, step)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no trace for step {step}")
        self.check(path.with_suffix(".json"))
        ck = (str(path), path.stat().st_mtime)
        with self._lock:
            if ck in self._cache:
                self._cache.move_to_end(ck)
                return self._cache[ck]
        ts = read_trace_step(path)
        with self._lock:
            self._cache[ck] = ts
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ts

    def step_summary(self, key: str, step: int, quantity: str, layer: str) -> dict:
        """`summarize_step` of one step, cached by file and modification time."""
        path = self.step_path(key, step)
        ck = (str(path), path.stat().st_mtime if path.exists() else 0.0, quantity, layer)
        if ck not in self._summary_cache:
            self._summary_cache[ck] = summarize_step(self.load(key, step), quantity, layer)
        return self._summary_cache[ck]


# ----------------------------------------------------------------------------------------------------------------
# Values


def step_quantities(step: TraceStep) -> list[str]:
    """Quantities (`pos`, `tokloss`) traced in a step, from its metadata or, failing that, its arrays."""
    q = [_QUANTITY_META[x] for x in step.meta.get("quantities", []) if x in _QUANTITY_META]
    if q:
        return q
    keys = set().union(*(s.arrays for s in step.sequences)) if step.sequences else set()
    return [name for name in QUANTITIES if f"{name}.alignment" in keys]


def step_layers(step: TraceStep) -> list[str]:
    """Names of the traced layers of a step (the order of the `L` axis)."""
    return list(step.meta.get("layers", []))


def metric_key(metric: str, quantity: str = "pos", layer: str = ALL_LAYERS,
               scheme: str | None = None) -> tuple[str, int | None]:
    """Array name (and row of the `L` axis, or None) holding `metric` for the given quantity/layer/scheme.

    `layer` is `"all"` (the sum over traced layers) or the index of a traced layer as a string; a layer applies to
    the per-position quantity only (per-token-loss gradients are traced over all parameters at once).

    Raises:
        ValueError: unknown metric, quantity or scheme, or a layer index that is not an integer.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    if metric == "weight":
        if not isinstance(scheme, str) or not _SCHEME_KEY.match(scheme):
            raise ValueError(f"unknown scheme {scheme!r}: not a weight.<key> suffix")
        return f"weight.{scheme}", None
    if metric not in GRAD_METRICS:
        return metric, None
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {list(QUANTITIES)}")
    if quantity == "pos" and layer not in (None, ALL_LAYERS, ""):
        try:
            return f"pos.layer.{metric}", int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"layer must be 'all' or an integer index, got {layer!r}") from None
    return f"{quantity}.{metric}", None


def metric_values(
    seq: TraceSequence, metric: str, quantity: str = "pos", layer: str = ALL_LAYERS, scheme: str | None = None
) -> np.ndarray:
    """Per-token values `(T,) float32` of `metric` for one sequence (NaN where the token is not a target).

    Raises:
        MissingDataError: the trace has no such array (quantity not traced, layer index out of range).
    """
    key, row = metric_key(metric, quantity, layer, scheme)
    a = seq.get(key)
    if a is None:
        raise MissingDataError(
            f"sequence {seq.meta.get('index')}: no array {key!r} in this trace "
            f"(it has {sorted(k for k in seq.arrays if '.' in k or k in METRICS)})"
        )
    a = np.asarray(a, dtype=np.float32)
    if row is not None:
        if a.ndim != 2 or not 0 <= row < a.shape[0]:
            raise MissingDataError(f"array {key!r} of shape {a.shape} has no layer {row}")
        a = a[row]
    return a.reshape(-1)


def completion_mask(seq: TraceSequence) -> np.ndarray:
    """(T,) bool: supervised target tokens (`is_completion`)."""
    m = seq.get("is_completion")
    if m is None:
        return np.isfinite(np.asarray(seq.get("loss", np.full(len(seq.tokens), np.nan)), dtype=np.float32))
    return np.asarray(m).astype(bool).reshape(-1)


def auto_vmax(*arrays: np.ndarray) -> float:
    """Scale of the diverging colour map: the largest finite |value| over `arrays`, 1.0 when there is none (or 0)."""
    m = 0.0
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        f = a[np.isfinite(a)]
        if f.size:
            m = max(m, float(np.abs(f).max()))
    return m if m > 0 else 1.0


def fmt(v: float) -> str:
    """Compact number for tooltips and tables (`–` for NaN)."""
    v = float(v)
    if math.isnan(v):
        return "–"
    return f"{v:.4g}"


def token_records(seq: TraceSequence, quantity: str = "pos", layer: str = ALL_LAYERS) -> list[dict]:
    """One dict per token with every value the trace holds for it: `t`, `token`, `category`, `role`, `loss`, `p`,
    `entropy`, `{pos,tokloss}.{dot,norm,alignment}`, `pos[layer].*` when a layer is chosen, `weight.*`."""
    T = len(seq.tokens)
    comp = completion_mask(seq)
    cols: dict[str, np.ndarray] = {}
    for k in ("loss", "p", "entropy"):
        if k in seq.arrays:
            cols[k] = np.asarray(seq[k], dtype=np.float32).reshape(-1)
    for q in QUANTITIES:
        for m in GRAD_METRICS:
            if f"{q}.{m}" in seq.arrays:
                cols[f"{q}.{m}"] = np.asarray(seq[f"{q}.{m}"], dtype=np.float32).reshape(-1)
    if layer not in (None, ALL_LAYERS, ""):
        for m in GRAD_METRICS:
            try:
                cols[f"pos[{layer}].{m}"] = metric_values(seq, m, "pos", layer)
            except MissingDataError:
                pass
    for s in sequence_schemes(seq):
        cols[f"weight.{s}"] = np.asarray(seq[f"weight.{s}"], dtype=np.float32).reshape(-1)
    recs = []
    for t in range(T):
        r = {
            "t": t,
            "token": seq.tokens[t],
            "category": seq.categories[t] if t < len(seq.categories) else "",
            "role": "completion" if comp[t] else "prompt",
        }
        for k, a in cols.items():
            r[k] = float(a[t]) if t < a.shape[0] else math.nan
        recs.append(r)
    return recs


def summarize_step(step: TraceStep, quantity: str = "pos", layer: str = ALL_LAYERS) -> dict:
    """Token-weighted means over the completion tokens of all sequences of a step, overall and per category.

    Returns:
        `{"all": {metric: mean}, "by_category": {category: {metric: mean}}, "n_tokens": int}` with metrics
        `alignment`, `dot`, `norm` (of `quantity`/`layer`), `loss`, `p`, `entropy`, `weight.<scheme>`, for each
        scheme with an affected-token rule (`step_scheme_rules`) the fraction `affected.<scheme>` of tokens it
        affects (its weight 0 for `zero`, < 1 for `below_one`), and `G_norm` (mean over sequences of ||G||).
        Missing arrays give NaN.
    """
    rules = step_scheme_rules(step)
    schemes = list(rules)
    names = ["alignment", "dot", "norm", "loss", "p", "entropy"] + [f"weight.{s}" for s in schemes]
    names += [f"affected.{s}" for s in schemes if rules[s]["affects"] is not None]
    cols: dict[str, list[np.ndarray]] = {n: [] for n in names}
    cats: list[np.ndarray] = []
    gnorms = []
    for seq in step.sequences:
        m = completion_mask(seq)
        T = len(m)
        cats.append(np.asarray(seq.categories[:T] + [""] * (T - len(seq.categories)))[m])
        for n in names[:6]:
            try:
                v = metric_values(seq, n, quantity, layer)
            except (MissingDataError, ValueError):
                v = np.full(T, np.nan, np.float32)
            cols[n].append(v[m])
        for s in schemes:
            w = np.asarray(seq.get(f"weight.{s}", np.full(T, np.nan)), dtype=np.float32).reshape(-1)[m]
            cols[f"weight.{s}"].append(w)
            if rules[s]["affects"] is not None:
                f = affected(w, rules[s]["affects"]).astype(np.float32)
                f[~np.isfinite(w)] = np.nan
                cols[f"affected.{s}"].append(f)
        if quantity == "pos" and layer not in (None, ALL_LAYERS, ""):
            lg, li = seq.get("pos.layer.G_norm"), int(layer)
            g = np.asarray(lg).reshape(-1)[li] if lg is not None and 0 <= li < np.asarray(lg).size else None
        else:
            g = seq.get(f"{quantity}.G_norm")
        if g is not None:
            gnorms.append(float(np.asarray(g, dtype=np.float64).reshape(-1)[0]))
    flat = {n: (np.concatenate(v) if v else np.zeros(0, np.float32)) for n, v in cols.items()}
    allcats = np.concatenate(cats) if cats else np.zeros(0, dtype=str)

    def _mean(a: np.ndarray) -> float:
        f = a[np.isfinite(a)]
        return float(f.mean()) if f.size else math.nan

    out = {"all": {n: _mean(a) for n, a in flat.items()}, "by_category": {}, "n_tokens": int(allcats.size)}
    out["all"]["G_norm"] = float(np.mean(gnorms)) if gnorms else math.nan
    for c in CATEGORIES:
        sel = allcats == c
        if sel.any():
            out["by_category"][c] = {n: _mean(a[sel]) for n, a in flat.items()}
    return out
