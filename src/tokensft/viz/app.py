"""The Gradio app of `tokensft viz`: token view, scheme overlay, token table, trends, clustering and compare tabs
over the gradient traces of one or more run directories.

Gradio is imported lazily (`pip install 'tokensft[viz]'`); everything the tabs show is computed by
`tokensft.viz.views` from traces read through `tokensft.viz.data.RunStore`, which reads nothing outside the run
directories it was given and loads no pickle.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from tokensft.viz import views
from tokensft.viz.cluster import methods
from tokensft.viz.data import (
    ALL_LAYERS,
    METRICS,
    QUANTITIES,
    PathRefusedError,
    RunStore,
    scheme_name,
    step_quantities,
    step_scheme_rules,
)
from tokensft.viz.render import message_html

logger = logging.getLogger(__name__)

TITLE = "tokensft · per-token gradient traces"


def import_gradio():
    """Import gradio, or raise ImportError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise  # gradio is there but broken: show the real error
        raise ImportError("the visualizer needs gradio: pip install 'tokensft[viz]'") from e
    return gr


def _first(choices, default=None):
    return choices[0][1] if choices else default


def build_app(run_dirs, store: RunStore | None = None):
    """Build the Gradio Blocks app over the traces of `run_dirs`.

    Args:
        run_dirs: run directories (each with a `traces/` folder, or a parent of several).
        store: an existing `RunStore` to use instead of building one from `run_dirs`.

    Returns:
        `gr.Blocks`, not launched.

    Raises:
        ImportError: gradio is not installed.
        FileNotFoundError: no run directory with traces was found.
    """
    store = store or RunStore(list(run_dirs))  # before gradio's slow import: bad directories fail fast
    gr = import_gradio()

    # ---- initial selection --------------------------------------------------------------------------------
    run0 = _first(store.choices())
    steps0 = store.steps(run0)
    step0 = steps0[0] if steps0 else None
    ts0 = store.load(run0, step0) if step0 is not None else None
    seqs0 = views.sequence_choices(ts0) if ts0 else []
    quants0 = step_quantities(ts0) if ts0 else list(QUANTITIES)
    layers0 = views.layer_choices(ts0) if ts0 else [("all layers (sum)", ALL_LAYERS)]
    # every scheme the first trace records (the tracer overlays every registered scheme), in the metadata's order
    rules0 = step_scheme_rules(ts0)
    schemes0 = list(rules0)
    runs = store.choices()
    trend_choices = views.trend_metrics(views.runs_scheme_rules(store, [r for _, r in runs]))
    run_b0 = runs[1][1] if len(runs) > 1 else run0
    steps_b0 = store.steps(run_b0)

    def q_choices(qs):
        return [(QUANTITIES[q], q) for q in qs] or [(v, k) for k, v in QUANTITIES.items()]

    with gr.Blocks(title="tokensft viz", analytics_enabled=False) as demo:
        gr.Markdown(f"### {TITLE}\nHover a token for all its values. Runs: "
                    + ", ".join(f"`{r.label}`" for r in store.runs.values()))
        with gr.Row():
            run = gr.Dropdown(runs, value=run0, label="Run", elem_id="tsft-run", scale=2)
            step = gr.Dropdown([(str(s), str(s)) for s in steps0], value=str(step0) if step0 is not None else None,
                               label="Step", elem_id="tsft-step", scale=1)
            seq = gr.Dropdown(seqs0, value=_first(seqs0), label="Sequence", elem_id="tsft-seq", scale=4,
                              min_width=320)  # its labels are long (problem id + first words): room for them
            quantity = gr.Radio(q_choices(quants0), value=quants0[0] if quants0 else "pos", label="Quantity",
                                elem_id="tsft-quantity", scale=2)
            layer = gr.Dropdown(layers0, value=ALL_LAYERS, label="Layer (per-position only)", elem_id="tsft-layer",
                                scale=2)
            reload_btn = gr.Button("↻ reload", size="sm", scale=0, min_width=80)
        with gr.Accordion("Open a run or trace file by path", open=False):
            with gr.Row():
                path_box = gr.Textbox(label="Path inside " + ", ".join(str(r) for r in store.roots),
                                      placeholder="RUN_DIR, RUN_DIR/traces or RUN_DIR/traces/step_00000010.safetensors",
                                      elem_id="tsft-path", scale=4)
                open_btn = gr.Button("Open", elem_id="tsft-open", scale=0)
            path_msg = gr.Markdown(elem_id="tsft-path-msg")

        with gr.Tabs():
            with gr.Tab("Token view", id="tokens"):
                with gr.Row():
                    metric = gr.Radio([(v, k) for k, v in METRICS.items()], value="alignment", label="Metric",
                                      elem_id="tsft-metric", scale=4)
                    scheme = gr.Radio([(scheme_name(k, rules0), k) for k in schemes0],
                                      value=schemes0[0] if schemes0 else None, label="Scheme",
                                      visible=False, elem_id="tsft-scheme", scale=2)
                    vmax = gr.Number(0, label="colour scale ±vmax (0 = auto)", minimum=0, elem_id="tsft-vmax", scale=1)
                token_html = gr.HTML(elem_id="tsft-token-view")
            with gr.Tab("Scheme overlay", id="overlay"):
                gr.Markdown("Tokens coloured by alignment; outlined: the tokens each traced scheme affects, by the "
                            "rule it declares (`register_scheme(affects=...)`, recorded in the trace metadata): "
                            "weight 0 for a dropping scheme (`sft-topk`, `rho1`), weight < 1 for a clipping or "
                            "down-weighting one (`sft-antiop`, `sft-lr`, ...).")
                overlay_html = gr.HTML(elem_id="tsft-overlay")
            with gr.Tab("Token table", id="table"):
                completion_only = gr.Checkbox(True, label="completion tokens only")
                table = gr.Dataframe(interactive=False, elem_id="tsft-table", max_height=600)
            with gr.Tab("Trends", id="trends"):
                with gr.Row():
                    trend_runs = gr.Dropdown(runs, value=[r for _, r in runs], multiselect=True, label="Runs",
                                             scale=3)
                    trend_metric = gr.Dropdown([(v, k) for k, v in trend_choices.items()], value="alignment",
                                               label="Metric (mean over completion tokens)", scale=2)
                    by_cat = gr.Checkbox(False, label="split by token category", scale=1)
                trend_plot = gr.HTML(elem_id="tsft-trends")
            with gr.Tab("Clustering", id="clustering"):
                with gr.Row():
                    scope = gr.Radio(["this sequence", "all sequences of the step"], value="all sequences of the step",
                                     label="Tokens")
                    color_by = gr.Radio(["category", "alignment"], value="category", label="Colour by")
                    method = gr.Radio(methods(), value="PCA", label="Embedding"
                                      + ("" if len(methods()) > 1 else " (t-SNE needs scikit-learn)"))
                cluster_note = gr.Markdown()
                cluster_plot = gr.Plot(elem_id="tsft-cluster")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    run_a = gr.Dropdown(runs, value=run0, label="Run A")
                    step_a = gr.Dropdown([str(s) for s in steps0], value=str(steps0[-1]) if steps0 else None,
                                         label="Step A")
                    run_b = gr.Dropdown(runs, value=run_b0, label="Run B")
                    step_b = gr.Dropdown([str(s) for s in steps_b0], value=str(steps_b0[-1]) if steps_b0 else None,
                                         label="Step B")
                    example = gr.Dropdown([], label="Example (traced by both)")
                    cmp_metric = gr.Dropdown([(v, k) for k, v in METRICS.items()], value="alignment", label="Metric")
                cmp_html = gr.HTML(elem_id="tsft-compare")

        # ---- callbacks ------------------------------------------------------------------------------------
        def _safe(fn, n_out, default):
            def wrapped(*a):
                try:
                    return fn(*a)
                except Exception as e:  # noqa: BLE001 - shown to the user instead of a stack trace
                    logger.exception("viz callback failed")
                    msg = message_html(f"{type(e).__name__}: {e}")
                    return (msg,) + default[1:] if n_out > 1 else msg
            return wrapped

        def refresh(run_k, step_v, seq_v, q, lay, met, sch, vm, comp_only, scope_v, color_v, method_v):
            if run_k is None or step_v in (None, "") or seq_v in (None, ""):
                msg = message_html("no trace step selected")
                return msg, msg, None, None, ""
            st, si = int(step_v), int(seq_v)
            lay = lay or ALL_LAYERS
            tok = views.token_view(store, run_k, st, si, met, q, lay, sch, float(vm or 0))
            ovl = views.overlay_view(store, run_k, st, si, q, lay, float(vm or 0))
            try:
                tab = views.token_table(store, run_k, st, si, q, lay, bool(comp_only))
            except (KeyError, ValueError, FileNotFoundError):
                tab = None
            fig, note = views.cluster_figure(store, run_k, st, si if scope_v == "this sequence" else None, q, lay,
                                             color_v, method_v)
            return tok, ovl, tab, fig, note

        view_inputs = [run, step, seq, quantity, layer, metric, scheme, vmax, completion_only, scope, color_by, method]
        view_outputs = [token_html, overlay_html, table, cluster_plot, cluster_note]
        safe_refresh = _safe(refresh, 5, (None, None, None, None, ""))

        def on_run(run_k, step_v, seq_v, sch):
            steps = store.steps(run_k)
            st = step_v if step_v not in (None, "") and int(step_v) in steps else (str(steps[0]) if steps else None)
            ts = store.load(run_k, int(st)) if st is not None else None
            sc = views.sequence_choices(ts) if ts else []
            sv = seq_v if any(v == seq_v for _, v in sc) else _first(sc)
            qs = step_quantities(ts) if ts else list(QUANTITIES)
            rules = step_scheme_rules(ts)  # this run's schemes, named as its metadata declares them
            return (gr.update(choices=[(str(s), str(s)) for s in steps], value=st), gr.update(choices=sc, value=sv),
                    gr.update(choices=views.layer_choices(ts) if ts else [("all layers (sum)", ALL_LAYERS)],
                              value=ALL_LAYERS),
                    gr.update(choices=q_choices(qs), value=qs[0] if qs else "pos"),
                    gr.update(choices=[(scheme_name(k, rules), k) for k in rules],
                              value=sch if sch in rules else next(iter(rules), None)))

        def on_step(run_k, step_v, seq_v):
            if step_v in (None, ""):
                return gr.update(choices=[], value=None)
            sc = views.sequence_choices(store.load(run_k, int(step_v)))
            return gr.update(choices=sc, value=seq_v if any(v == seq_v for _, v in sc) else _first(sc))

        run_inputs, run_outputs = [run, step, seq, scheme], [step, seq, layer, quantity, scheme]
        for trigger, fn, ins, outs in (
            (run.input, on_run, run_inputs, run_outputs),
            (reload_btn.click, on_run, run_inputs, run_outputs),
            (step.input, on_step, [run, step, seq], [seq]),
        ):
            trigger(fn, ins, outs).then(safe_refresh, view_inputs, view_outputs)
        for comp in (seq, quantity, layer, scheme, vmax, completion_only, scope, color_by, method):
            comp.input(safe_refresh, view_inputs, view_outputs)
        metric.input(lambda m: gr.update(visible=m == "weight"), [metric], [scheme]).then(
            safe_refresh, view_inputs, view_outputs)

        def open_path(p):
            try:
                r, st = store.open_path(p)
            except PathRefusedError as e:
                return f"**Refused.** {e}", *[gr.update()] * 5
            except (FileNotFoundError, ValueError) as e:
                return f"**Cannot open:** {e}", *[gr.update()] * 5
            choices = store.choices()
            key = str(r.path)
            msg = f"Opened `{r.label}`" + (f" at step {st}" if st is not None else "")
            return (msg, gr.update(choices=choices, value=key), gr.update(choices=choices),
                    gr.update(choices=choices), gr.update(value=str(st) if st is not None else None),
                    gr.update(choices=choices))  # Trends: the opened run is offered, not selected

        for event in (open_btn.click, path_box.submit):
            event(open_path, [path_box], [path_msg, run, run_a, run_b, step, trend_runs]).then(
                on_run, run_inputs, run_outputs).then(safe_refresh, view_inputs, view_outputs)

        # trends
        def trends(rs, met, bc, q, lay):
            return views.trends_html(store, list(rs or []), met, q, lay or ALL_LAYERS, bool(bc))

        def trend_metric_choices(rs, met):
            # the metrics of the selected runs: every scheme their traces record, user schemes included
            choices = views.trend_metrics(views.runs_scheme_rules(store, list(rs or [])))
            return gr.update(choices=[(v, k) for k, v in choices.items()],
                             value=met if met in choices else "alignment")

        t_inputs = [trend_runs, trend_metric, by_cat, quantity, layer]
        trend_runs.input(trend_metric_choices, [trend_runs, trend_metric], [trend_metric]).then(
            trends, t_inputs, [trend_plot], concurrency_limit=CONCURRENCY)
        gr.on([c.input for c in t_inputs[1:]], trends, t_inputs, [trend_plot], api_name="trends",
              concurrency_limit=CONCURRENCY)

        # compare
        def cmp_steps(r):
            s = [str(x) for x in store.steps(r)]
            return gr.update(choices=s, value=s[-1] if s else None)

        def cmp_examples(ra, sa, rb, sb, ex):
            if sa in (None, "") or sb in (None, ""):
                return gr.update(choices=[], value=None)
            common = [str(e) for e in views.common_examples(store, ra, int(sa), rb, int(sb))]
            return gr.update(choices=common, value=ex if ex in common else (common[0] if common else None))

        def compare(ra, sa, rb, sb, ex, met, q, lay, sch):
            if ex in (None, ""):
                return message_html("the two runs traced no common example at these steps")
            return views.compare_view(store, ra, int(sa), rb, int(sb), int(ex), met, q, lay or ALL_LAYERS, sch)

        c_inputs = [run_a, step_a, run_b, step_b, example, cmp_metric, quantity, layer, scheme]
        ex_inputs = [run_a, step_a, run_b, step_b, example]
        safe_compare = _safe(compare, 1, None)
        run_a.input(cmp_steps, [run_a], [step_a]).then(cmp_examples, ex_inputs, [example]).then(
            safe_compare, c_inputs, [cmp_html])
        run_b.input(cmp_steps, [run_b], [step_b]).then(cmp_examples, ex_inputs, [example]).then(
            safe_compare, c_inputs, [cmp_html])
        for comp in (step_a, step_b):
            comp.input(cmp_examples, ex_inputs, [example]).then(safe_compare, c_inputs, [cmp_html])
        for comp in (example, cmp_metric, quantity, layer):
            comp.input(safe_compare, c_inputs, [cmp_html])

        def initial(*a):
            vals = safe_refresh(*a[: len(view_inputs)])
            rest = a[len(view_inputs):]
            tr = trends(*rest[:5])
            exu = cmp_examples(*rest[5:10])
            ex = exu.get("value") if isinstance(exu, dict) else None
            cm = safe_compare(rest[5], rest[6], rest[7], rest[8], ex, *rest[10:])
            return (*vals, tr, exu, cm)

        demo.load(initial, view_inputs + t_inputs + ex_inputs + [cmp_metric, quantity, layer, scheme],
                  view_outputs + [trend_plot, example, cmp_html])
    demo.tsft_store = store  # for tests and callers that want the same store
    return demo


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


class SameOriginOnly:
    """ASGI middleware: refuse (403) a request that another site, or a DNS-rebinding page, could have sent.

    - `Origin: null` (sandboxed frames, `file://` pages, some redirects) is refused: it names no site to trust.
    - An `Origin` naming another site than the one served (its host:port is not the request's `Host`) is refused:
      browsers send `Origin` on cross-site requests, so a page elsewhere cannot post to the app (uploads, queue joins)
      while a user has it open.
    - A `Host` that is not one of `allowed_hosts` is refused: a DNS-rebinding page sends its own site in both `Host`
      and `Origin` (they agree), but that name is not the address the app was started on. With `allowed_hosts` None
      (the app deliberately served on a network address) any `Host` passes.
    Requests without `Origin` (the page's own GETs, curl) pass the Origin checks.

    Args:
        app: the ASGI app.
        allowed_hosts: the `Host` values (lower-case `name:port`) the app answers to, or None for any.
    """

    def __init__(self, app, allowed_hosts: frozenset[str] | None = None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    def refusal(self, headers: dict[str, str]) -> bytes | None:
        """Why a request with these (lower-cased) headers is refused, or None."""
        origin, host = headers.get("origin"), headers.get("host", "").lower()
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return b"request for another host refused"
        if origin == "null":
            return b"request from an opaque origin refused"
        if origin and origin.split("://", 1)[-1].rstrip("/").lower() != host:
            return b"cross-origin request refused"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            body = self.refusal(headers)
            if body is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The `Host` header values an app served on `host:port` answers to: on a loopback address its loopback names
    (`127.0.0.1`, `localhost`, `[::1]`, and `host` itself) with the port; None (any) on a network address."""
    if not _is_loopback(host):
        return None
    names = {"127.0.0.1", "localhost", "[::1]", host.lower()}
    return frozenset(f"{n}:{port}" for n in names)


MAX_UPLOAD = "1kb"
CONCURRENCY = 4  # events of one kind running at once (Gradio's default is 1: every client waits for every other)
MAX_QUEUE = 256  # waiting events beyond this are refused with "queue full" rather than piling up
MAX_SESSIONS = 64  # sessions whose component state Gradio keeps (its default of 10,000 grows without bound here)  # the app has no upload component: Gradio's upload route is capped to next to nothing


def theme():
    """A Gradio theme that uses the fonts gradio ships (no font download)."""
    gr = import_gradio()
    return gr.themes.Default(primary_hue="blue", neutral_hue="slate")


def launch(run_dirs, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, quiet: bool = False):
    """Build the app over `run_dirs` and serve it on `host:port`.

    Args:
        run_dirs: run directories (see `build_app`).
        host: interface to bind; 127.0.0.1 by default. Anything that is not a loopback address exposes the traces
            (and the typed-path box) to the network, which is logged as a warning.
        port: TCP port.
        block: wait until interrupted (the CLI); False returns right after the server started (tests).
        quiet: suppress gradio's start-up banner.

    Uploads are capped at `MAX_UPLOAD` (the app has none); cross-origin, `Origin: null` and, on a loopback address,
    other-`Host` (DNS rebinding) requests are refused (`SameOriginOnly`);
    up to `CONCURRENCY` events of a kind run at once, `MAX_QUEUE` wait, `MAX_SESSIONS` sessions keep state.

    Returns:
        The launched `gr.Blocks` (call `.close()` to stop a non-blocking server).
    """
    demo = build_app(run_dirs)
    if not _is_loopback(host):
        logger.warning("serving on %s: the traces are reachable from the network", host)
    from starlette.middleware import Middleware

    # independent requests run side by side (the store is thread-safe); old sessions' state is dropped
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=MAX_QUEUE)
    demo.launch(state_session_capacity=MAX_SESSIONS, server_name=host, server_port=int(port), prevent_thread_lock=not block, quiet=quiet,
                share=False, inbrowser=False, show_error=True, ssr_mode=False, theme=theme(),
                footer_links=[], mcp_server=False, max_file_size=MAX_UPLOAD,
                app_kwargs={"middleware": [Middleware(SameOriginOnly, allowed_hosts=allowed_hosts(host, int(port)))]})
    return demo
