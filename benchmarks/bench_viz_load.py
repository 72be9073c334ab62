"""Load on the visualizer: C clients (threads, each its own `gradio_client.Client`) send N requests in all to a
`tokensft viz` server on 127.0.0.1 (a child process), in two phases, each on a server of its own:

- cached: N `/trends` requests with varying metrics and per-category switches, after a warm-up round that renders
  every one of them once, so every request is served from the trends cache (`run_load`);
- uncached: a fresh server, no warm-up, and every request a view nobody has asked for yet (`run_uncached`): each
  client alternates the first view of a sequence (the token view and everything it refreshes, of a trace step no one
  has loaded) and the first view of a trend (a run, metric, per-category switch and quantity not rendered yet).

Each phase reports p50 / p95 / max latency, errors, and the resident memory of the server before and after the load
(cached: after the warm-up; uncached: once the server answers, before any view). Goal (issue: the visualizer under
load): 200 requests from 20 clients, no errors, p95 < 2 s, memory growth < 50 MB; `meets_goal` says, per phase,
whether it was met. The `uptime` line before and after the two phases is recorded with them.

    python benchmarks/bench_viz_load.py [--runs DIR ...] [--requests 200] [--clients 20] [--out FILE.json]

The cached phase serves `--runs`, or without it a synthetic run (tests/viz/viz_synthetic.py `make_known_run`); the
uncached phase always serves synthetic runs (`make_synthetic_run`), two per client, so that no two requests share a
trace step or a trend. JSON to stdout and, with `--out`, to that file (written whole or not at all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METRICS = ("alignment", "p", "loss", "entropy")
UNCACHED_TREND_METRICS = ("alignment", "dot", "norm", "loss", "p", "entropy")
GOAL = {"requests": 200, "clients": 20, "p95_s": 2.0, "rss_growth_mb": 50.0}


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def uptime() -> str:
    """The `uptime` line (load averages over 1, 5 and 15 minutes), or `os.getloadavg()` where there is no `uptime`."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _serve(run_dirs: list[str]):
    """Start `tokensft viz RUN_DIRS --port P` as a child process; returns (process, url) once it answers."""
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


def _split(requests: int, clients: int) -> list[int]:
    """Requests per client: `requests` spread as evenly as possible over `clients`."""
    return [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]


def _latency(lat: list[float]) -> dict:
    """p50 / p95 / max / mean of `lat` in seconds (None each when empty)."""
    lat = sorted(lat)
    if not lat:
        return {"p50": None, "p95": None, "max": None, "mean": None}

    def q(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)

    return {"p50": q(0.5), "p95": q(0.95), "max": round(lat[-1], 3), "mean": round(statistics.mean(lat), 3)}


def _drive(url: str, plans: list[list[tuple[str, str, tuple]]]) -> tuple[dict[str, list[float]], list[str], float]:
    """One thread and one `Client` per entry of `plans`, each sending its (kind, api_name, args) requests in order,
    all clients at once. A request that fails, or whose first output is the app's notice in place of a view (what
    the token view shows for an exception), is an error. Returns (latencies by kind, errors, wall seconds)."""
    from gradio_client import Client

    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def client(plan) -> None:
        try:
            c = Client(url, verbose=False)
        except Exception as e:  # noqa: BLE001 - counted, reported
            with lock:
                errors.extend([f"connect: {type(e).__name__}: {e}"] * len(plan))
            return
        for kind, api_name, args in plan:
            t = time.perf_counter()
            try:
                out = c.predict(*args, api_name=api_name)
                first = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(first, str) and 'class="tsft-msg"' in first:
                    raise RuntimeError(f"the app answered with a notice: {first[-200:]}")
                with lock:
                    latencies.setdefault(kind, []).append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, errors, time.perf_counter() - t0


def _meets_goal(res: dict) -> bool:
    """`GOAL` met by one phase's result: no errors, p95 below `p95_s`, server memory growth below `rss_growth_mb`."""
    p95 = res["latency_s"]["p95"]
    return (res["errors"] == 0 and p95 is not None and p95 < GOAL["p95_s"]
            and res["server_rss_mb"]["growth"] < GOAL["rss_growth_mb"])


def _result(requests: int, clients: int, latencies: dict[str, list[float]], errors: list[str], wall: float,
            rss_before: float, rss_after: float, load_start: float, before: str) -> dict:
    """One phase's JSON: counts, latency over all its requests, server memory (the first reading named `before`),
    the 1-minute load average at its start and end, and `meets_goal`."""
    every = [x for lat in latencies.values() for x in lat]
    res = {
        "requests": requests, "clients": clients, "ok": len(every), "errors": len(errors),
        "first_errors": errors[:5], "wall_s": round(wall, 2), "latency_s": _latency(every),
        "server_rss_mb": {before: round(rss_before, 1), "after_load": round(rss_after, 1),
                          "growth": round(rss_after - rss_before, 1)},
        "load_avg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2), "cores": os.cpu_count()},
    }
    res["meets_goal"] = _meets_goal(res)
    return res


def run_load(run_dirs: list[str], requests: int, clients: int) -> dict:
    """The cached phase: `requests` `/trends` requests from `clients` clients over all runs of `run_dirs`, cycling
    through `METRICS` x per-category, after a warm-up that renders each of those once."""
    from gradio_client import Client

    load_start = os.getloadavg()[0]
    proc, url = _serve(run_dirs)
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
        plans = [[("trends", "/trends", (labels, METRICS[(i + j) % len(METRICS)], bool((i + j) % 2), "pos", "all"))
                  for j in range(n)] for i, n in enumerate(_split(requests, clients))]
        latencies, errors, wall = _drive(url, plans)
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return _result(requests, clients, latencies, errors, wall, rss_before, rss_after, load_start, "after_warmup")


def make_uncached_runs(root: Path, requests: int, clients: int) -> Path:
    """Synthetic runs under `root` for `run_uncached`: per client `s{i}` (one trace step per sequence view it will
    send) and `t{i}` (the runs of its trends). Raises ValueError when a client would need more distinct trends than
    `UNCACHED_TREND_METRICS` x per-category x the two quantities."""
    from tests.viz.viz_synthetic import make_synthetic_run

    per_client = max(_split(requests, clients))
    if math.ceil(per_client / 2) > 4 * len(UNCACHED_TREND_METRICS):
        raise ValueError(f"{per_client} requests per client: more distinct trends than the uncached phase has")
    steps = tuple(10 * (k + 1) for k in range(max(1, math.ceil(per_client / 2))))
    for i in range(clients):
        make_synthetic_run(root / f"s{i:02d}", steps=steps, n_seq=2, seed=2 * i)
        make_synthetic_run(root / f"t{i:02d}", steps=steps, n_seq=2, seed=2 * i + 1)
    return root


def run_uncached(root: Path, requests: int, clients: int) -> dict:
    """The uncached phase over `make_uncached_runs(root, ...)`: a fresh server, no warm-up; client i alternates first
    views of sequences, its k-th one sequence k % 2 of the k-th step of run `s{i}` (the token view's refresh: token
    view, overlay, table, clustering; its trace step not loaded before), and first views of trends of run `t{i}`
    (each a metric x per-category x quantity not rendered yet). Latencies are also reported per kind (`sequence`,
    `trends`)."""
    from gradio_client import Client

    load_start = os.getloadavg()[0]
    proc, url = _serve([str(root)])
    try:
        api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
        keys = {Path(k).name: k for k in next(p for p in api["/trends"]["parameters"]
                                               if p.get("parameter_name") == "rs")["parameter_default"]}
        # the token view's refresh has no name of its own (Gradio names it after `_safe`'s wrapper): the endpoints
        # that take the 12 view inputs (run, step, sequence, quantity, layer, metric, ...), any one of them
        view_api_name, view_params = next((name, e["parameters"]) for name, e in api.items()
                                          if len(e["parameters"]) == 12)
        view_defaults = [p.get("parameter_default") for p in view_params]
        trends = [(m, bc, q) for q in ("pos", "tokloss") for m in UNCACHED_TREND_METRICS for bc in (False, True)]
        plans = []
        for i, n in enumerate(_split(requests, clients)):
            plan = []
            for j in range(n):
                if j % 2 == 0:
                    args = (keys[f"s{i:02d}"], str(10 * (j // 2 + 1)), str((j // 2) % 2), *view_defaults[3:])
                    plan.append(("sequence", view_api_name, args))
                else:
                    m, bc, q = trends[(i + j // 2) % len(trends)]
                    plan.append(("trends", "/trends", ([keys[f"t{i:02d}"]], m, bc, q, "all")))
            plans.append(plan)
        rss_before = rss_mb(proc.pid)
        latencies, errors, wall = _drive(url, plans)
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    res = _result(requests, clients, latencies, errors, wall, rss_before, rss_after, load_start, "after_start")
    res["by_kind"] = {k: {"ok": len(v), "latency_s": _latency(v)} for k, v in sorted(latencies.items())}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=None, help="run directories of the cached phase (default: a "
                    "synthetic run)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    tmp = Path(tempfile.mkdtemp())
    runs = a.runs
    if not runs:
        from tests.viz.viz_synthetic import make_known_run

        make_known_run(tmp / "runs" / "known")
        runs = [str(tmp / "runs")]
    uncached_root = make_uncached_runs(tmp / "uncached", a.requests, a.clients)
    before = uptime()
    res = {"goal": GOAL, "uncached": run_uncached(uncached_root, a.requests, a.clients),
           "cached": run_load(runs, a.requests, a.clients)}
    res["uptime"] = {"start": before, "end": uptime()}
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        from tokensft.io import atomic_write

        atomic_write(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
