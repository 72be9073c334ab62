"""Loss-only benchmark: peak memory and time of forward+backward per mode, ours vs. naive vs. TRL's nll path.

A random LM head (H=896, V=151,936: Qwen2.5-0.5B/1.5B-sized vocabulary) over B*T=4,096 hidden states. For each mode:

- `ours`: `tokensft.losses.chunked_softmax_stats` on hidden states + head (the trainer's path for every mode on CPU
  with the default `--loss_head auto`, and always for the KL modes and eaft's top-K entropy; on CUDA `auto` takes TRL's
  fused head for the other modes) -> `loss_from_log_probs` (the one pipeline: weights, `reduce_token_loss`,
  statistics);
- `naive`: full `(N, V)` logits, float32 log-softmax, the same weights and reduction;
- `trl_nll`: TRL's fused chunked log-prob function with a plain mean (TRL's `loss_type="nll"`), the memory yardstick.

Each measurement runs in a fresh subprocess; peak memory is the process's peak RSS minus its RSS after the inputs are
built (CPU) or `torch.cuda.max_memory_allocated` (GPU). Prints one JSON document.

    python benchmarks/bench_loss.py [--tokens 4096] [--modes sft,dft,...] [--device cpu|cuda] [--dtype float32] \
        [--out benchmarks/results/loss_h896_v151936_n4096.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ["sft", "dft", "sft-topk", "sft-antiop", "sft-lr", "sft+kl", "asft", "sft-pk", "rho1", "eaft"]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_one(impl: str, mode: str, tokens: int, hidden: int, vocab: int, device: str, dtype: str, repeats: int,
            frozen_head: bool = False) -> dict:
    import torch

    from tokensft.losses import TokenInputs, chunked_softmax_stats, get_scheme, loss_from_log_probs, topk_entropy

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    scheme = get_scheme(mode)
    h = torch.randn(tokens, hidden, device=device, dtype=dt, requires_grad=True)
    W = (torch.randn(vocab, hidden, device=device, dtype=dt) * 0.02).requires_grad_(not frozen_head)
    y = torch.randint(0, vocab, (tokens,), device=device)
    ref_h = torch.randn(tokens, hidden, device=device, dtype=dt) if (scheme.uses_kl or scheme.needs_reference) else None
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction  # import before measuring

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()

    topk = 20 if "topk_entropy" in scheme.needs else 0

    def step():
        ref_lp = top = None
        if impl == "trl_nll":
            out = _ChunkedLogProbFunction.apply(h, W, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                ("log_probs",))
            loss = -out[0].sum() / tokens
            loss.backward()
            return
        if impl == "ours":
            kl_dir = "forward" if scheme.uses_kl else "none"
            lp, _, kl, top = chunked_softmax_stats(h, y, weight=W, ref_x=ref_h if scheme.uses_kl else None,
                                                   ref_weight=W if scheme.uses_kl else None, kl_direction=kl_dir,
                                                   topk_entropy_k=topk)
            if scheme.needs_reference:
                with torch.no_grad():
                    ref_lp = chunked_softmax_stats(ref_h, y, weight=W).log_probs
        else:  # naive
            logq = torch.log_softmax((h @ W.t()).float(), -1)  # (N, V)
            lp = logq.gather(1, y[:, None])[:, 0]
            kl = None
            if topk:
                top = topk_entropy(logq, topk)
            if scheme.uses_kl or scheme.needs_reference:
                with torch.no_grad():
                    logr = torch.log_softmax((ref_h @ W.t()).float(), -1)
                if scheme.uses_kl:
                    kl = (logr.exp() * (logr - logq)).sum(-1)
                ref_lp = logr.gather(1, y[:, None])[:, 0]
        def row(x):  # (N,) -> (1, N)
            return None if x is None else x[None]

        out = loss_from_log_probs(TokenInputs(lp[None], mask, kl=row(kl), ref_log_probs=row(ref_lp),
                                              topk_entropy=row(top)), mode)
        out.loss.backward()

    step()  # warm-up (also the peak-memory measurement)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times = []
    for _ in range(repeats):
        h.grad = W.grad = None
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"impl": impl, "mode": mode, "frozen_head": frozen_head, "peak_mb": round(peak, 1),
            "time_s": round(times[len(times) // 2], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="B*T positions (default 4096)")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--impls", default="trl_nll,ours,naive")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--frozen_head", action="store_true",
                    help="the LM head gets no gradient (LoRA): only dL/dh is computed, by every impl")
    ap.add_argument("--out", default=None, help="also write the JSON here (whole or not at all)")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.tokens, a.hidden, a.vocab, a.device, a.dtype, a.repeats,
                                 a.frozen_head)))
        return
    results = []
    impls = a.impls.split(",")
    for mode in a.modes.split(","):
        for impl in impls:
            if impl == "trl_nll" and mode != a.modes.split(",")[0]:
                continue  # one yardstick is enough
            cmd = [sys.executable, __file__, "--one", impl, mode, "--tokens", str(a.tokens), "--hidden", str(a.hidden),
                   "--vocab", str(a.vocab), "--device", a.device, "--dtype", a.dtype, "--repeats", str(a.repeats),
                   *(["--frozen_head"] if a.frozen_head else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    trl = next((r for r in results if r["impl"] == "trl_nll"), None)
    summary = {}
    for mode in a.modes.split(","):
        ours = next(r for r in results if r["impl"] == "ours" and r["mode"] == mode)
        row = {"ours_peak_mb": ours["peak_mb"], "ours_time_s": ours["time_s"]}
        if naive := next((r for r in results if r["impl"] == "naive" and r["mode"] == mode), None):
            row["ours_over_naive_time"] = round(ours["time_s"] / max(naive["time_s"], 1e-9), 3)
        naive = next((r for r in results if r["impl"] == "naive" and r["mode"] == mode), None)
        if naive:
            row.update(naive_peak_mb=naive["peak_mb"], naive_time_s=naive["time_s"],
                       naive_over_ours_peak=round(naive["peak_mb"] / max(ours["peak_mb"], 1e-9), 2))
        if trl:
            row["ours_over_trl_nll_peak"] = round(ours["peak_mb"] / max(trl["peak_mb"], 1e-9), 3)
        summary[mode] = row
    from bench_report import emit

    from tokensft.runtime import environment

    emit({"config": vars(a) | {"one": None}, "machine": environment(), "trl_nll": trl, "per_mode": summary,
          "raw": results}, a.out)


if __name__ == "__main__":
    main()
