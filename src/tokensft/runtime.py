"""CPU thread count per phase, chosen by measurement.

On a small CPU the best torch thread count depends on the phase and on what else runs on the machine: training
multiplies large matrices (`(B·T, H) @ (H, 4H)`), where every core helps; token-by-token decoding multiplies
small ones (`(B, H) @ (H, 4H)`), where OpenMP threads spend their time waiting on each other, and waiting on a
core that another process holds stalls every thread (measured here: 1.5 tokens/s with 2 threads against 14.7 with 1
on a loaded 2-core box; training 1.7× faster with 2). So before each phase `pick_threads` times a matmul of the
phase's shape at 1 thread and at every available core, interleaved, and keeps the faster by the median of 5 rounds —
under a second, against minutes of work.

An explicit choice always wins: `--threads N` on the command line, or `OMP_NUM_THREADS` in the environment (as
set for benchmarks). On CUDA nothing is changed.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

__all__ = ["BF16_MIN_GAIN", "PHASE_SHAPES", "available_cores", "best_matmul_seconds", "cpu_bf16_speedup",
           "cpu_bf16_pays", "environment", "pick_threads", "retain_freed_memory", "set_threads"]

logger = logging.getLogger("tokensft")

# (M, K, N) of the probe matmul per phase: a transformer MLP projection at H = 576 (SmolLM2-135M), 4 × 384 tokens
# for a training step or a teacher-forced forward, 64 rows (one decoding step of the evaluation's batch of 64)
PHASE_SHAPES: dict[str, tuple[int, int, int]] = {"train": (1536, 576, 1536), "decode": (64, 576, 1536)}
# fewer threads are kept unless more are at least this much faster (they also cost the other jobs on the machine)
MIN_GAIN = 1.2
# bf16 is the CPU training default only where its matmuls measure at least this much faster than fp32's: bf16
# autocast also pays for casts and fp32 statistics, and trains slightly differently (docs/performance.md)
BF16_MIN_GAIN = 1.5


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (x86 `avx512_bf16` or `amx_bf16` in /proc/cpuinfo's flags).
    There bf16 autocast pays: 0.67-0.71x the fp32 training step on the 2-core Zen 4 dev box (docs/performance.md);
    elsewhere bf16 is emulated. False where the flags cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_BF16_SPEEDUP: float | None = None


def cpu_bf16_speedup(budget_s: float = 0.05) -> float:
    """Measured speed of a bf16 matmul over an fp32 one on this CPU, at the training probe's shape
    (`PHASE_SHAPES["train"]`) and 1 thread: fp32 seconds / bf16 seconds, each the best of the repetitions that fit in
    `budget_s` (about 0.2 s in all, once per process; cached). 0.0 without native bf16 (`cpu_has_native_bf16`: nothing
    to measure, bf16 is emulated there).

    Why measured, not read from the flags: `avx512_bf16` alone does not make bf16 fast. Seen on this project's
    machines (docs/performance.md, `benchmarks/results/bf16_matmul_cpu*.json`): about 4.5x on an AMD EPYC Zen 4,
    9-12x on an Intel Xeon with AMX, and 0.55-0.7x (slower than fp32) on an Intel Xeon whose hypervisor shows
    avx512_bf16 but not AMX."""
    global _BF16_SPEEDUP
    if _BF16_SPEEDUP is None:
        if not cpu_has_native_bf16():
            _BF16_SPEEDUP = 0.0
        else:
            import torch

            threads = torch.get_num_threads()
            m, k, n = PHASE_SHAPES["train"]
            a, b = torch.randn(m, k), torch.randn(k, n)
            try:
                torch.set_num_threads(1)
                fp32 = bf16 = float("inf")
                for _ in range(2):  # interleaved: both see the same load
                    fp32 = min(fp32, best_matmul_seconds(a, b, budget_s / 2))
                    bf16 = min(bf16, best_matmul_seconds(a.bfloat16(), b.bfloat16(), budget_s / 2))
            finally:
                torch.set_num_threads(threads)
            _BF16_SPEEDUP = fp32 / bf16
    return _BF16_SPEEDUP


def cpu_bf16_pays() -> bool:
    """Whether bf16 training should be the default on this CPU: `cpu_bf16_speedup()` >= `BF16_MIN_GAIN`."""
    return cpu_bf16_speedup() >= BF16_MIN_GAIN


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_RETAINED = False


def retain_freed_memory() -> bool:
    """Keep freed CPU tensor memory in the process for reuse (glibc `mallopt`), instead of handing it back to the OS.

    PyTorch's CPU allocator is plain `malloc`. glibc serves every block above its mmap threshold (adaptive, from
    128 KiB) with a fresh `mmap` and returns it with `munmap` when freed, so each of a training step's thousands of
    activation-sized temporaries (a `(B*T, 1536)` float32 tensor is 12 MiB) is zero-filled page by page by the
    kernel again. With the mmap threshold at glibc's maximum (32 MiB) and trimming off, they come from the heap that
    the previous step freed. Measured on SmolLM2-135M's LoRA step: see docs/performance.md ("malloc"). The peak
    resident memory is unchanged (the same blocks are reused); the process keeps its high-water mark instead of
    returning it between steps. Does nothing off glibc or where `TOKENSFT_KEEP_MALLOC=1` is set; once per process.

    Returns:
        whether the settings were applied (now or before).
    """
    global _RETAINED
    if _RETAINED:
        return True
    if os.environ.get("TOKENSFT_KEEP_MALLOC") == "1":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 * 1024 * 1024)))
    except (OSError, AttributeError):  # not glibc
        return False
    _RETAINED = ok
    return ok


_COMMIT: str | None = ""  # "" = not looked up yet


def environment() -> dict:
    """What a published number depends on: CPU model and its vector/matrix flags, cores, torch threads, the 1-minute
    load average, library versions and the tokensft commit (when run from a git checkout). Recorded in every
    `train_results.json`, `metrics.json` and benchmark JSON."""
    import platform
    import subprocess

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "trl"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed, or broken: recorded as absent
            versions[name] = None
    global _COMMIT
    if _COMMIT == "":
        _COMMIT = None
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            _COMMIT = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    commit = _COMMIT
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"cpu_model": model or platform.processor(), "cpu_flags": sorted(
                f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni", "fma")),
            "cores": available_cores(), "torch_threads": threads,
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), **versions, "tokensft_commit": commit}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; `os.cpu_count()` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _probe_seconds(phase: str, threads: int, budget_s: float = 0.06) -> float:
    """Seconds per probe matmul of `phase` at `threads` torch threads (the best of the repetitions in `budget_s`)."""
    import torch

    m, k, n = PHASE_SHAPES[phase]
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.set_num_threads(threads)
    return best_matmul_seconds(a, b, budget_s)


def best_matmul_seconds(a, b, budget_s: float = 0.06) -> float:
    """Best wall time in seconds of `a @ b` (`a: (M, K)`, `b: (K, N)`, any dtype) over the repetitions that fit in
    `budget_s`, after one warm-up (the thread pool resizes, and kernels are picked, on first use)."""
    a @ b
    best, t_end = float("inf"), time.perf_counter() + budget_s
    while True:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            return best


def _busy_cores(window_s: float = 0.1) -> float:
    """Cores kept busy by other processes right now: the non-idle share of all CPUs' time in /proc/stat over
    `window_s` seconds, while this process sleeps. 0.0 where /proc/stat cannot be read."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(vals), vals[3] + vals[4]

    try:
        total0, idle0 = snap()
        time.sleep(window_s)
        total1, idle1 = snap()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else (1 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def pick_threads(phase: str, *, requested: int | None = None, cores: int | None = None, rounds: int = 5,
                 probe: Callable[[str, int], float] | None = None, load: float | None = None) -> tuple[int, str]:
    """The torch thread count for `phase` and the reason, in words.

    Args:
        phase: `"train"` (large matmuls: training steps, reference and held-out NLL forwards) or `"decode"`
            (generation), see `PHASE_SHAPES`.
        requested: an explicit count (`--threads`); None or 0 = decide.
        cores: cores available (default `available_cores()`).
        rounds: probe rounds; 1 thread and all cores alternate within each round, so both see the same load, and
            each is judged by its median round (a stall of the multi-threaded matmul on a busy machine counts; one
            lucky round does not).
        probe: `probe(phase, threads) -> seconds` (default: time a matmul; tests pass a fake).
        load: cores busy with other processes (default: measured now, `_busy_cores`); they are not offered to
            the probe: seen 2026-12-07, with a training at 1 thread on the other core of 2,
            the probe's half-second snapshot picked 2 decode threads (0.71 vs 0.58 ms) and the evaluation then ran
            at 162 s a problem instead of about 1 s, every step waiting on the thread that shared a busy core.

    Returns:
        (threads, reason): `requested` when given; torch's current count when `OMP_NUM_THREADS` is set; else the
        count whose median probe was fastest, more threads only when at least `MIN_GAIN`× faster.

    Raises:
        ValueError: unknown phase or a negative `requested`.
    """
    if phase not in PHASE_SHAPES:
        raise ValueError(f"phase must be one of {sorted(PHASE_SHAPES)}, got {phase!r}")
    if requested is not None and requested < 0:
        raise ValueError(f"--threads must be >= 0 (0 = choose by measurement), got {requested}")
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        import torch

        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = cores or available_cores()
    if cores <= 1:
        return 1, "one core"
    busy = _busy_cores() if load is None else load
    usable = max(1, min(cores, int(cores - busy + 0.5)))
    if usable == 1:
        return 1, f"{busy:.1f} of {cores} cores busy with other processes"
    cores = usable
    probe = probe or _probe_seconds
    times: dict[int, list[float]] = {1: [], cores: []}
    for _ in range(rounds):
        for t in times:
            times[t].append(probe(phase, t))
    med = {t: statistics.median(v) for t, v in times.items()}
    chosen = cores if med[1] >= MIN_GAIN * med[cores] else 1
    return chosen, f"measured: {med[1] * 1e3:.2f} ms with 1 thread, {med[cores] * 1e3:.2f} ms with {cores} (medians)"


def set_threads(phase: str, requested: int | None = None, *, device: str | None = None) -> int:
    """Choose (`pick_threads`) and set torch's CPU thread count for `phase`, and keep freed tensor memory for reuse
    (`retain_freed_memory`); logs the choice. Leaves CUDA runs alone
    (`device` starting with "cuda", or None with a GPU present). Returns the thread count in use."""
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.get_num_threads()
    retain_freed_memory()
    threads, why = pick_threads(phase, requested=requested)
    torch.set_num_threads(threads)
    logger.info("%s on %d CPU thread%s (%s)", phase, threads, "" if threads == 1 else "s", why)
    return threads
