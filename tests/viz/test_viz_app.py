"""The app builder and the `viz` CLI verb (no browser)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
from tests.viz.viz_synthetic import make_known_run

from tokensft.cli import viz as viz_cli

HAS_GRADIO = importlib.util.find_spec("gradio") is not None


def _parse(argv):
    p = argparse.ArgumentParser(prog="tokensft")
    viz_cli.add_parser(p.add_subparsers(dest="verb"))
    return p.parse_args(argv)


def test_cli_defaults_to_localhost():
    args = _parse(["viz", "r1", "r2"])
    assert args.run_dirs == ["r1", "r2"] and args.host == "127.0.0.1" and args.port == 7860
    assert args.func is viz_cli.main
    args = _parse(["viz", "r", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.host, args.port) == ("0.0.0.0", 9000)


def test_cli_errors(tmp_path, capsys):
    assert viz_cli.main(_parse(["viz", str(tmp_path / "missing")])) == 2
    assert "not a directory" in capsys.readouterr().err
    assert viz_cli.main(_parse(["viz", str(tmp_path), "--port", "0"])) == 2
    if HAS_GRADIO:
        assert viz_cli.main(_parse(["viz", str(tmp_path), "--port", "7861"])) == 2  # no traces/ below it
        assert "traces" in capsys.readouterr().err


def test_missing_gradio_is_explained(monkeypatch):
    from tokensft.viz import app

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=r"pip install 'tokensft\[viz\]'"):
        app.import_gradio()


@pytest.mark.skipif(not HAS_GRADIO, reason="gradio is not installed (pip install 'tokensft[viz]')")
def test_build_app(tmp_path):
    import gradio as gr

    from tokensft.viz.app import build_app

    make_known_run(tmp_path / "runs" / "a")
    make_known_run(tmp_path / "runs" / "b", steps=(30,))
    demo = build_app([tmp_path / "runs"])
    assert isinstance(demo, gr.Blocks)
    store = demo.tsft_store
    assert sorted(r.label for r in store.runs.values()) == ["a", "b"]
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert {"Run", "Step", "Sequence", "Quantity", "Metric", "Run A", "Run B"} <= labels
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Token view", "Scheme overlay", "Token table", "Trends", "Clustering", "Compare"]


def test_no_pickle_in_viz():
    """The visualizer reads traces with safetensors + JSON only: no pickle, torch.load or np.load anywhere."""
    from pathlib import Path

    import tokensft.viz

    src = "".join(p.read_text() for p in Path(tokensft.viz.__file__).parent.glob("*.py"))
    for banned in ("import pickle", "torch.load", "np.load(", "allow_pickle"):
        assert banned not in src


@pytest.mark.skipif(not HAS_GRADIO, reason="needs the [viz] extra (gradio)")
def test_served_app_refuses_uploads_and_cross_origin_requests(tmp_path):
    """Gradio's upload route: a file over the 1 kB cap is refused (the app has no upload component), and any request
    from another origin gets 403, while the app's own page still loads."""
    import socket
    import urllib.error
    import urllib.request

    from tokensft.viz.app import launch

    make_known_run(tmp_path / "runs" / "known")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch([tmp_path / "runs"], "127.0.0.1", port, block=False, quiet=True)
    base = f"http://127.0.0.1:{port}"

    def post_upload(origin=None, size=4096, host=None):
        boundary = "tsftboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{base}/gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              **({"Origin": origin} if origin else {}),
                                              **({"Host": host} if host else {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        with urllib.request.urlopen(f"{base}/", timeout=60) as r:
            assert r.status == 200
        status, _ = post_upload(origin="http://evil.example", size=10)
        assert status == 403
        status, body = post_upload()  # same origin (no Origin header): over the cap
        assert status in (400, 413), (status, body[:200])
        status, _ = post_upload(origin=base, size=10)
        assert status != 403  # the app's own origin is not refused
        # issue 31, item 7: both were accepted and stored
        assert post_upload(origin="null", size=10)[0] == 403  # an opaque origin (sandboxed frame, file:// page)
        rebinding = f"evil.example:{port}"  # a DNS-rebinding page: its own name in Host and Origin, which agree
        assert post_upload(origin=f"http://{rebinding}", host=rebinding, size=10)[0] == 403
        assert post_upload(host=rebinding, size=10)[0] == 403
        status, _ = post_upload(origin=f"http://localhost:{port}", host=f"localhost:{port}", size=10)
        assert status != 403  # the loopback names of the address it was started on pass
    finally:
        demo.close()
