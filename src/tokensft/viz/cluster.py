"""2-D embeddings of per-token gradient directions for the Clustering tab: PCA (numpy SVD) and, when scikit-learn
is installed, t-SNE.

Directions are the rows of the stored random projections (`tokloss.grad_proj`, else `pos.{l}.dy_proj`), each scaled
to unit L2 norm, so the embedding groups tokens whose gradients point the same way regardless of their magnitude.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from tokensft.tracing.schema import TraceSequence
from tokensft.viz.data import ALL_LAYERS, completion_mask, metric_values


def tsne_available() -> bool:
    """True when scikit-learn (for t-SNE) can be imported."""
    return importlib.util.find_spec("sklearn") is not None


def methods() -> list[str]:
    """Embedding methods available here: `PCA`, plus `t-SNE` when scikit-learn is installed."""
    return ["PCA", "t-SNE"] if tsne_available() else ["PCA"]


def pca_2d(X: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Principal-component projection of the rows of `X`.

    Args:
        X: (N, k) float; rows are points.
        n_components: output dimensions (padded with zeros when `min(N, k)` is smaller).

    Returns:
        `Y` (N, n_components) float64: centred `X` projected on the top right-singular vectors, each component's
        sign fixed so that its largest-|.| loading is positive; `explained` (n_components,): fraction of the total
        variance each component explains (0 when the data have no variance).

    Raises:
        ValueError: `X` is not 2-D or has no rows.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"pca_2d: need a non-empty (N, k) array, got shape {X.shape}")
    Xc = X - X.mean(axis=0, keepdims=True)
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)  # Vt: (min(N,k), k)
    r = min(n_components, Vt.shape[0])
    V = Vt[:r].copy()
    for i in range(r):
        if V[i, np.argmax(np.abs(V[i]))] < 0:
            V[i] = -V[i]
    Y = np.zeros((X.shape[0], n_components))
    Y[:, :r] = Xc @ V.T
    total = float((S**2).sum())
    explained = np.zeros(n_components)
    if total > 0:
        explained[:r] = S[:r] ** 2 / total
    return Y, explained


def tsne_2d(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE embedding (N, 2) of the rows of `X` with scikit-learn (perplexity min(30, (N-1)/3), PCA init).

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: fewer than 4 points.
    """
    if not tsne_available():
        raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn")
    from sklearn.manifold import TSNE

    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {X.shape[0]}")
    perplexity = float(min(30.0, (X.shape[0] - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X)


@dataclass
class Directions:
    """Unit-norm gradient directions of completion tokens and what they are."""

    X: np.ndarray  # (N, k) float64, unit rows
    alignment: np.ndarray  # (N,) alignment of each token (NaN when missing)
    categories: list[str]
    labels: list[str]  # "s{seq}#t 'piece'"
    source: str  # which array the directions come from


def _dy_proj_key(seq: TraceSequence, layer: str) -> str | None:
    if layer not in (None, ALL_LAYERS, "") and f"pos.{int(layer)}.dy_proj" in seq.arrays:
        return f"pos.{int(layer)}.dy_proj"
    keys = sorted((k for k in seq.arrays if k.startswith("pos.") and k.endswith(".dy_proj")),
                  key=lambda k: int(k.split(".")[1]) if k.split(".")[1].isdigit() else 0)
    return keys[0] if keys else None


def gradient_directions(seqs: list[TraceSequence], quantity: str = "tokloss", layer: str = ALL_LAYERS) -> Directions:
    """Collect the per-token gradient directions of the completion tokens of `seqs`.

    Source: `tokloss.grad_proj` (T, k) when present, else `pos.{l}.dy_proj` (T, k) of the chosen layer (the first
    stored layer when all layers are chosen); except that choosing the per-position quantity and one layer whose
    `pos.{l}.dy_proj` is stored uses that layer's projection. Rows with a non-finite entry or zero norm are dropped;
    the rest are scaled to unit norm.

    Raises:
        ValueError: none of the sequences holds `tokloss.grad_proj` or a `pos.{l}.dy_proj` projection.
    """
    one_layer = layer not in (None, ALL_LAYERS, "")

    def pick(seq: TraceSequence) -> str | None:
        if quantity == "pos" and one_layer and f"pos.{int(layer)}.dy_proj" in seq.arrays:
            return f"pos.{int(layer)}.dy_proj"
        return "tokloss.grad_proj" if "tokloss.grad_proj" in seq.arrays else _dy_proj_key(seq, layer)

    rows, al, cats, labels, sources = [], [], [], [], set()
    for seq in seqs:
        key = pick(seq)
        if key is None:
            continue
        sources.add(key)
        P = np.asarray(seq[key], dtype=np.float64)  # (T, k)
        m = completion_mask(seq)[: P.shape[0]]
        aq = "tokloss" if key.startswith("tokloss") else "pos"
        try:
            a = metric_values(seq, "alignment", aq, ALL_LAYERS if aq == "tokloss" else (key.split(".")[1]))
        except ValueError:
            a = np.full(P.shape[0], np.nan)
        for t in np.nonzero(m)[0]:
            v = P[t]
            n = np.linalg.norm(v)
            if not np.all(np.isfinite(v)) or n == 0:
                continue
            rows.append(v / n)
            al.append(float(a[t]) if t < a.shape[0] else np.nan)
            cats.append(seq.categories[t] if t < len(seq.categories) else "")
            labels.append(f"s{seq.meta.get('index')}#{t} {seq.tokens[t]!r}")
    if not sources:
        raise ValueError(
            "no gradient projections in this trace: neither tokloss.grad_proj nor pos.{l}.dy_proj was stored "
            "(trace with a projection dimension > 0 to enable clustering)"
        )
    X = np.stack(rows) if rows else np.zeros((0, 1))
    return Directions(X=X, alignment=np.asarray(al, dtype=np.float64), categories=cats, labels=labels,
                      source=", ".join(sorted(sources)))
