"""Embeddings of gradient directions: PCA against an eigendecomposition reference, and the choice of source array."""

from __future__ import annotations

import numpy as np
import pytest
from tests.viz.viz_synthetic import KNOWN_PROMPT, make_known_run

from tokensft.viz.cluster import gradient_directions, methods, pca_2d, tsne_available
from tokensft.viz.data import RunStore


def test_pca_matches_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(47, 6)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 3.0
    Y, ev = pca_2d(X)
    Xc = X - X.mean(0)
    w, V = np.linalg.eigh(np.cov(Xc.T))  # ascending
    ref = Xc @ V[:, ::-1][:, :2]
    for i in range(2):  # up to sign
        s = np.sign(ref[:, i] @ Y[:, i])
        np.testing.assert_allclose(Y[:, i], s * ref[:, i], atol=1e-9)
    np.testing.assert_allclose(ev, w[::-1][:2] / w.sum(), rtol=1e-9)


def test_pca_recovers_planar_data_up_to_isometry():
    rng = np.random.default_rng(1)
    P = rng.normal(size=(30, 2)) * [4.0, 1.0]
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    X = np.hstack([P, np.zeros((30, 3))]) @ Q  # the plane rotated into 5-D
    Y, ev = pca_2d(X)
    d = lambda A: np.linalg.norm(A[:, None] - A[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(Y), d(P), atol=1e-9)
    assert ev.sum() == pytest.approx(1.0)


def test_pca_degenerate_inputs():
    Y, ev = pca_2d(np.ones((4, 3)))
    np.testing.assert_allclose(Y, 0)
    np.testing.assert_array_equal(ev, 0)
    Y, _ = pca_2d(np.array([[1.0], [2.0], [4.0]]))  # k = 1: second component padded with zeros
    assert Y.shape == (3, 2) and np.all(Y[:, 1] == 0)
    with pytest.raises(ValueError):
        pca_2d(np.zeros((0, 3)))


def test_methods_listed():
    assert methods()[0] == "PCA" and (("t-SNE" in methods()) == tsne_available())


def _seqs(tmp_path, **kw):
    make_known_run(tmp_path / "a", **kw)
    store = RunStore([tmp_path / "a"])
    return store.load(next(iter(store.runs)), 20).sequences


def test_directions_prefer_tokloss_grad_proj(tmp_path):
    seqs = _seqs(tmp_path)
    d = gradient_directions(seqs, "pos", "all")
    assert d.source == "tokloss.grad_proj"
    assert d.X.shape == (10, 3)  # 5 completion tokens x 2 sequences
    np.testing.assert_allclose(np.linalg.norm(d.X, axis=1), 1.0)
    t = KNOWN_PROMPT
    raw = np.array([t + 1.0, 1.0 if t % 2 == 0 else -1.0, 0.0])
    np.testing.assert_allclose(d.X[0], raw / np.linalg.norm(raw), rtol=1e-3)
    # alignment of the tokloss quantity comes with it (known: alignment / 4)
    assert d.alignment[0] == pytest.approx(0.125)
    # per-position + one layer whose dy_proj is stored: that layer's projection
    d1 = gradient_directions(seqs, "pos", "1")
    assert d1.source == "pos.1.dy_proj"
    np.testing.assert_allclose(d1.X[0], raw[::-1] / np.linalg.norm(raw), rtol=1e-3)
    assert d1.alignment[0] == pytest.approx(-0.5)  # layer 1 alignment = -alignment


def test_directions_fall_back_to_dy_proj_then_fail(tmp_path):
    d = gradient_directions(_seqs(tmp_path / "x", with_tokloss=False), "tokloss", "all")
    assert d.source == "pos.1.dy_proj"
    with pytest.raises(ValueError, match="no gradient projections"):
        gradient_directions(_seqs(tmp_path / "y", with_proj=False), "tokloss", "all")


def test_tsne_needs_sklearn_or_embeds():
    from tokensft.viz.cluster import tsne_2d

    X = np.random.default_rng(0).normal(size=(12, 4))
    if not tsne_available():
        with pytest.raises(ImportError, match="scikit-learn"):
            tsne_2d(X)
    else:
        assert tsne_2d(X).shape == (12, 2)
