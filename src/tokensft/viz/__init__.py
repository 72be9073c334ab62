"""Gradio visualizer of per-token gradient traces (`tokensft viz RUN_DIR ...`).

`tokensft.viz.app.build_app(run_dirs)` builds the app and `launch(run_dirs, host, port)` serves it; both import
gradio lazily (`pip install 'tokensft[viz]'`). The colour scale (`colors`), trace access with its path guard
(`data`), HTML rendering (`render`), embeddings (`cluster`) and tab contents (`views`) need no gradio.
"""

from tokensft.viz.colors import diverging_rgb
from tokensft.viz.data import PathRefusedError, RunStore, resolve_inside


def build_app(run_dirs):
    """See `tokensft.viz.app.build_app`."""
    from tokensft.viz.app import build_app as _build

    return _build(run_dirs)


def launch(run_dirs, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """See `tokensft.viz.app.launch`."""
    from tokensft.viz.app import launch as _launch

    return _launch(run_dirs, host, port, **kwargs)


__all__ = ["PathRefusedError", "RunStore", "build_app", "diverging_rgb", "launch", "resolve_inside"]
