"""`tokensft viz RUN_DIR [RUN_DIR ...] [--host 127.0.0.1] [--port 7860]`: serve the Gradio visualizer of the
per-token gradient traces of one or more training runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DESCRIPTION = """\
Serve a local web app over the per-token gradient traces (RUN_DIR/traces/) of one or more runs.

Tabs: Token view (the traced sequence coloured by alignment, <g_t, G>, ||g_t||, CE loss, p_t, entropy or a scheme's
weight, on a diverging scale centred at 0; hover a token for all its values), Scheme overlay (the tokens each traced
scheme affects by the rule it declares, e.g. sft-topk drops, sft-antiop clips, against their alignment), Token table (sortable), Trends (metrics over
training steps), Clustering (PCA of per-token gradient directions) and Compare (two runs on the same example).

A RUN_DIR may also be a parent directory: its sub-directories with traces/ are listed as runs. The app reads only
inside the directories given here (a path typed into the UI outside them is refused) and loads no pickle.
It binds to 127.0.0.1 unless --host says otherwise. Needs gradio: pip install 'tokensft[viz]'.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `viz` verb on an argparse subparsers object; sets `func=main`."""
    p = subparsers.add_parser(
        "viz", help="serve the Gradio visualizer of per-token gradient traces", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="training output directory with a traces/ folder (or a parent of several)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the traces)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Validate the run directories, then serve the app until interrupted. Returns a process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        print(f"tokensft viz: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"tokensft viz: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        from tokensft.viz.app import launch

        launch(args.run_dirs, args.host, args.port, block=True)
    except ImportError as e:
        print(f"tokensft viz: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"tokensft viz: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the port is taken
        print(f"tokensft viz: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # python -m tokensft.cli.viz RUN_DIR ...
    _parser = argparse.ArgumentParser(prog="tokensft")
    add_parser(_parser.add_subparsers(dest="verb", required=True))
    _args = _parser.parse_args(["viz", *sys.argv[1:]])
    sys.exit(_args.func(_args))
