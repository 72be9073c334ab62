"""Load on the visualizer: C clients (threads, each its own `gradio_client.Client`) send N requests in all to the
`/trends` endpoint of a `tokensft viz` server on 127.0.0.1, with varying metrics and per-category switches.

Reports p50 / p95 / max latency, errors, and the resident memory of the server (a child process: `tokensft viz`)
after a warm-up round and after the load. Goal (issue: the visualizer under load): 200 requests from 20 clients, no errors,
p95 < 2 s, memory growth < 50 MB.

    python benchmarks/bench_viz_load.py [--runs DIR ...] [--requests 200] [--clients 20] [--out FILE.json]

Without `--runs` it serves a synthetic run (tests/viz/viz_synthetic.py). JSON to stdout and, with `--out`, to that
file (written whole or not at all).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

METRICS = ("alignment", "p", "loss", "entropy")


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _serve(run_dirs: list[str]):
    """Start `tokensft viz RUN_DIRS --port P` as a child process; returns (process, url) once it answers."""
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tokensft.cli.main", "viz", *run_dirs, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"tokensft viz exited with code {proc.returncode}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("tokensft viz did not answer within 2 minutes")


def run_load(run_dirs: list[str], requests: int, clients: int) -> dict:
    from gradio_client import Client

    proc, url = _serve(run_dirs)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    try:
        warm = Client(url, verbose=False)
        labels = None
        for dep in warm.view_api(print_info=False, return_format="dict")["named_endpoints"]["/trends"]["parameters"]:
            if dep.get("parameter_name") in ("rs", "runs"):
                labels = dep.get("parameter_default")
        for m in METRICS:  # warm-up: fonts, caches, every metric once
            for bc in (False, True):
                warm.predict(labels, m, bc, "pos", "all", api_name="/trends")
        rss_before = rss_mb(proc.pid)

        def client(i: int, n: int) -> None:
            try:
                c = Client(url, verbose=False)
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.extend([f"connect: {type(e).__name__}: {e}"] * n)
                return
            for j in range(n):
                t = time.perf_counter()
                try:
                    c.predict(labels, METRICS[(i + j) % len(METRICS)], bool((i + j) % 2), "pos", "all",
                              api_name="/trends")
                    with lock:
                        latencies.append(time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {str(e)[:200]}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i, n)) for i, n in enumerate(per_client)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(latencies)
    q = (lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)) if lat else (lambda p: None)
    return {
        "requests": requests, "clients": clients, "ok": len(lat), "errors": len(errors),
        "first_errors": errors[:5], "wall_s": round(wall, 2),
        "latency_s": {"p50": q(0.5), "p95": q(0.95), "max": round(lat[-1], 3) if lat else None,
                      "mean": round(statistics.mean(lat), 3) if lat else None},
        "server_rss_mb": {"after_warmup": round(rss_before, 1), "after_load": round(rss_after, 1),
                          "growth": round(rss_after - rss_before, 1)},
        "load_avg_1m": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=None, help="run directories (default: a synthetic run)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    runs = a.runs
    if not runs:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.viz.viz_synthetic import make_known_run

        root = Path(tempfile.mkdtemp()) / "runs"
        make_known_run(root / "known")
        runs = [str(root)]
    res = run_load(runs, a.requests, a.clients)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        from tokensft.io import atomic_write

        atomic_write(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
