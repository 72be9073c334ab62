"""`tokensft sweep --config BASE.yaml --modes sft,sft-topk,sft-antiop,sft-lr --seeds 0,1`: train + evaluate each.

For every (mode, seed) it trains `BASE.yaml` with that mode and seed into `OUT/<mode>-s<seed>` and evaluates the
result; the base model is evaluated once as the baseline. Interrupted sweeps resume: finished trainings (their
`train_results.json`) are skipped and evaluations continue from their `generations.jsonl`. Writes `OUT/results.md`
and `OUT/results.csv`: Method | accuracy ± 95% CI | Δ vs baseline | truncation rate | training time | training nll
(mean of the last 10 logged steps), one row per run, plus a mean over seeds per mode.

With `--nll_data FILE` (held-out problems with reference solutions, e.g. ../shared/data/math500/test.jsonl) every
model is also scored by the teacher-forced NLL of those solutions (`tokensft.eval.heldout`), with its difference to
the baseline on the same sequences and a 95% interval: at small scale a far less noisy measure than accuracy.
A mode may carry its own scheme parameters as `MODE:key=value[;key=value]` (`sft-align:align_rule=clip`): it
trains into `OUT/sft-align_align_rule-clip-s<seed>` with `--align_rule clip` added, so variants of one mode sit side
by side. `--skip_accuracy` leaves out the generation (the slow part on CPU) and reports the held-out NLL only.
`--trace_modes sft,sft-antiop` keeps the recipe's `trace_*` settings for those modes only (tracing never changes
training, so traced and untraced runs stay comparable) and runs `trace analyze` on each traced run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

from tokensft.cli.train import int_at_least, threads_count


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="train + evaluate several modes and seeds, resumable, results table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base training recipe (YAML, as for `tokensft train`)")
    p.add_argument("--modes", default="sft,sft-topk,sft-antiop,sft-lr",
                   help="comma-separated loss modes, each optionally MODE:key=value[;key=value] "
                        "(e.g. sft-align:align_rule=clip)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--out", default=None, help="sweep directory (default: the config's output_dir)")
    p.add_argument("--benchmark", default="math500", help="evaluation benchmark (default: math500)")
    p.add_argument("--data", default=None, help="local benchmark file (default: ../shared/data/... or the hub)")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate the first N problems")
    p.add_argument("--max_new_tokens", type=int_at_least(1), default=512, help="generation limit (default: 512)")
    p.add_argument("--batch_size", type=int_at_least(1), default=64, help="generation batch size (default: 64)")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm"],
                   help="generation backend of the accuracy evaluations, as `tokensft eval --backend` (default: auto, "
                   "vllm where it is installed)")
    p.add_argument("--skip_accuracy", action="store_true",
                   help="no generation: report training and the held-out NLL (--nll_data) only")
    p.add_argument("--nll_data", default=None,
                   help="held-out rows with reference solutions for the teacher-forced NLL column (default: none)")
    p.add_argument("--nll_limit", type=int_at_least(1), default=None, help="score only the first N --nll_data rows")
    p.add_argument("--nll_token_rows", type=int, default=0,
                   help="also keep every scored token's NLL for the first N held-out sequences (default: 0)")
    p.add_argument("--nll_split", default="test",
                   help="split of a hub / builtin --nll_data (default: test, i.e. held out)")
    p.add_argument("--trace_modes", default=None,
                   help="comma-separated modes that keep the recipe's trace_* settings (default: all modes); "
                        "the others train with tracing off")
    p.add_argument("--no_table", action="store_true", help="write the results table without printing it")
    p.add_argument("--no_train_time", action="store_true",
                   help="leave the training-time column out, so that a rerun writes the same table byte for byte")
    p.add_argument("--threads", type=threads_count, default=0,
                   help="CPU threads for every phase (default 0: chosen by measurement before each training, "
                        "generation and NLL phase; OMP_NUM_THREADS, when set, is kept)")
    p.add_argument("--eval_steps", default="",
                   help="comma-separated earlier optimizer steps whose checkpoints are evaluated too (e.g. 50 with "
                        "--max_steps 100), as OUT/eval/<name>-s<seed>-step<N>: with a constant learning rate after "
                        "warm-up, checkpoint N of a longer run is the N-step run (same batches, same updates); the "
                        "recipe must save them (save_strategy steps, save_steps dividing N)")
    p.add_argument("--baseline", default="base", help="'base' (the untouched model) or a mode name")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                   help="extra `tokensft train` overrides, e.g. --train_args --max_steps 50")
    p.set_defaults(func=main)
    return p


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """`MODE[:key=value[;key=value]]` → `(name, mode, train_args)`: the run's name (`MODE_key-value...`, safe as a
    directory name), the loss mode, and the `--key value` overrides. Raises ValueError on a malformed parameter."""
    mode, _, params = spec.partition(":")
    args, name = [], mode
    for item in filter(None, params.split(";")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"--modes {spec!r}: expected MODE:key=value[;key=value], got {item!r}")
        args += [f"--{key.strip()}", value.strip()]
        name += f"_{key.strip()}-{value.strip()}"
    return name, mode, args


def seconds_per_step(results: dict) -> float:
    """Seconds per optimizer step of a finished run from its `train_results.json`: `train_runtime_s` over the steps it
    covers. Since resumes are summed (`segments`), that is every step; a run written before that, resumed at step N
    (`resumed_from_step`, added from its log), timed only its last segment: its steps after N."""
    steps = int(results["global_step"]) - (0 if "segments" in results else int(results.get("resumed_from_step") or 0))
    return float(results["train_runtime_s"]) / max(steps, 1)


def run_dir(out: Path, name: str, seed: int) -> Path:
    """Where the sweep trains variant `name` (`parse_variant`) with `seed`: `OUT/<name>-s<seed>`."""
    return out / f"{name}-s{seed}"


def eval_key(name: str, seed: int, step: int | None = None) -> str:
    """The evaluation key (folder under `OUT/eval/` and `OUT/nll/`) of variant `name`, `seed`, after `step` optimizer
    steps (`--eval_steps`; None: the finished run): `<name>-s<seed>` or `<name>-s<seed>-step<N>`."""
    return f"{name}-s{seed}" + ("" if step is None else f"-step{step}")


def parse_eval_steps(spec: str, cfg) -> list[int]:
    """`--eval_steps 50,100` → `[50, 100]`, checked against the recipe `cfg` (a `TokenSFTConfig`): each step below
    `max_steps` and a multiple of `save_steps` under `save_strategy steps`, so its checkpoint will exist.
    Raises ValueError (one line, naming the flag) otherwise."""
    try:
        steps = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--eval_steps {spec!r}: expected comma-separated step counts, e.g. 50,100") from None
    if not steps:
        return []
    max_steps = int(cfg.max_steps or 0)
    strategy = str(getattr(cfg.save_strategy, "value", cfg.save_strategy))
    save_steps = cfg.save_steps
    for s in steps:
        if s <= 0 or (max_steps > 0 and s >= max_steps):
            raise ValueError(f"--eval_steps {s}: must be in (0, max_steps={max_steps}); the final model is always "
                             "evaluated")
        if strategy != "steps" or not save_steps or save_steps < 1 or s % int(save_steps):
            raise ValueError(f"--eval_steps {s}: the recipe saves no checkpoint-{s} (save_strategy={strategy}, "
                             f"save_steps={save_steps}); use save_strategy steps with save_steps dividing {s}")
    return steps


def format_category_rows(rows: list[dict], base_nll: dict | None, base_nll_key: str | None = None) -> str:
    """Markdown table of the held-out NLL Δ vs the baseline per token category (paired, 95% CI), one row per run
    other than the baseline's own (`base_nll_key`); empty when there is no held-out NLL."""
    cats = [c for c, s in (base_nll or {}).get("by_category", {}).items() if s["num_tokens"]]
    scored = [r for r in rows if r.get("heldout_nll_diff_by_category") and r.get("nll_key") != base_nll_key]
    if not cats or not scored:
        return ""
    by = base_nll["by_category"]
    head = ["Method", *(f"{c} (n={by[c]['num_tokens']}, base {by[c]['nll_per_token']:.3f})" for c in cats)]
    md = ("\nHeld-out NLL Δ vs baseline per token category (nats/token, paired 95% CI; n = scored tokens):\n\n"
          "| " + " | ".join(head) + " |\n|" + "|".join(" --- " for _ in head) + "|\n")
    for r in scored:
        d = r["heldout_nll_diff_by_category"]
        md += "| " + " | ".join([r["name"], *(f"{d[c]['mean_diff']:+.3f} ({d[c]['ci95'][0]:+.3f} to "
                                              f"{d[c]['ci95'][1]:+.3f})" for c in cats)]) + " |\n"
    return md


def format_rows(rows: list[dict], baseline: dict | None, *, train_time: bool = True) -> tuple[str, str]:
    """Markdown and CSV of the sweep table (accuracies in percent); `train_time=False` leaves out the one column
    that differs between reruns of the same sweep (wall time), so that the table is the same byte for byte."""
    base_acc = baseline["accuracy"] if baseline else None
    with_nll = any(r.get("heldout_nll") is not None for r in rows)
    header = ["Method", "Acc (%)", "95% CI", "Δ vs baseline", "truncated (%)", "train time (s)",
              "train nll (last 10 logs)"]
    if not train_time:
        header.remove("train time (s)")
    if with_nll:
        header += ["held-out NLL", "Δ held-out NLL (95% CI)"]
    table = []
    for r in rows:
        lo, hi = r.get("ci") or (None, None)
        acc = r.get("accuracy")
        delta = "" if base_acc is None or acc is None or r is baseline else f"{100 * (acc - base_acc):+.1f}"
        nll = "" if r.get("final_nll") is None else f"{r['final_nll']:.4f}"
        t = "" if r.get("train_time_s") is None else f"{r['train_time_s']:.0f}"
        trunc = "" if r.get("truncation_rate") is None else f"{100 * r['truncation_rate']:.0f}"
        row = [r["name"], "" if acc is None else f"{100 * acc:.1f}",
               "" if acc is None else f"{100 * lo:.1f}–{100 * hi:.1f}", delta, trunc, *([t] if train_time else []), nll]
        if with_nll:
            h, d = r.get("heldout_nll"), r.get("heldout_nll_diff")
            row.append("" if h is None else f"{h:.4f}")
            row.append("" if d is None or r is baseline else
                       f"{d['mean_diff']:+.4f} ({d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})")
        table.append(row)
    md = "| " + " | ".join(header) + " |\n|" + "|".join(" --- " for _ in header) + "|\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in table)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *table])
    return md, buf.getvalue()


def _analyze_traces(run: Path) -> None:
    """`trace analyze` on a run that wrote traces (skipped if there are none or the report exists)."""
    traces = run / "traces"
    if not (traces / "manifest.jsonl").exists() or (run / "analysis" / "report.html").exists():
        return  # report.html is written last: an interrupted analysis is redone
    from tokensft.cli.trace import main as trace_main

    print(f"[sweep] analysing traces of {run}", flush=True)
    try:
        rc = trace_main(["analyze", str(run), "--out", str(run / "analysis"), "--no_pdf"])
    except Exception as e:  # an analysis failure must not cost the sweep's table
        rc = f"{type(e).__name__}: {e}"
    if rc:
        print(f"[sweep] warning: trace analyze failed for {run} ({rc}); run `tokensft trace analyze {run}`",
              file=sys.stderr)


def _seed_mean(mode: str, rs: list[dict]) -> dict:
    """One `mode (mean of N seeds)` row: means over the seeds' rows, ± 1 sd across seeds in the interval columns."""
    def mean_sd(values: list[float]) -> tuple[float, tuple[float, float]]:
        m = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return m, (m - sd, m + sd)

    acc, acc_band = (None, None) if any(r["accuracy"] is None for r in rs) else mean_sd([r["accuracy"] for r in rs])
    row = {"name": f"{mode} (mean of {len(rs)} seeds)", "accuracy": acc, "ci": acc_band,
           "train_time_s": statistics.mean(r["train_time_s"] or 0 for r in rs), "final_nll": None}
    if all(r.get("truncation_rate") is not None for r in rs):
        row["truncation_rate"] = statistics.mean(r["truncation_rate"] for r in rs)
    if all(r.get("final_nll") is not None for r in rs):
        row["final_nll"] = statistics.mean(r["final_nll"] for r in rs)
    if all(r.get("heldout_nll") is not None for r in rs):
        row["heldout_nll"] = statistics.mean(r["heldout_nll"] for r in rs)
    if all(r.get("heldout_nll_diff") for r in rs):
        d, band = mean_sd([r["heldout_nll_diff"]["mean_diff"] for r in rs])
        row["heldout_nll_diff"] = {"mean_diff": d, "ci95": band}
    return row


def sweep_tables(out: Path, names: list[str], seeds: list[int], *, baseline: str = "base", accuracy: bool = True,
                 nll: bool = True, train_time: bool = True) -> tuple[str, str, list[dict]]:
    """The sweep's tables from what it leaves on disk, and nothing else: `OUT/eval/<key>/metrics.json` (accuracy),
    `OUT/nll/<key>/heldout_nll.json` (held-out NLL per sequence and category) and `OUT/<name>-s<seed>/
    train_results.json` (training time and nll), with `<key>` = `base` or `<name>-s<seed>`. So a folder holding only
    these small files (an adapter-free copy, e.g. `docs/results/data/demo/`) rebuilds the same tables.

    Args:
        out: the sweep directory. names: variant names (`parse_variant`), in table order. seeds: their seeds.
        baseline: `base` or a variant name whose first seed is the Δ baseline.
        accuracy / nll: read the metrics / held-out NLL files (False: those columns stay empty).
        train_time: keep the training-time column (`format_rows`).

    Returns:
        `(markdown, csv, rows)`: the results table plus the per-category Δ table (and the seed-mean rows when there
        are several seeds) as Markdown, the results table as CSV, the rows as dicts.

    Raises:
        FileNotFoundError: a run without `train_results.json`.
    """
    from tokensft.eval.heldout import HELDOUT_FILE, paired_nll_difference
    from tokensft.eval.records import METRICS_FILE
    from tokensft.io import RESULTS_FILE

    def read(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    nll_results: dict[str, dict] = {}

    def row(name: str, key: str, res: dict | None, **extra) -> dict:
        m = (read(out / "eval" / key / METRICS_FILE) if accuracy else None) or {}
        h = read(out / "nll" / key / HELDOUT_FILE) if nll else None
        if h is not None:
            nll_results[key] = h
        return {"name": name, "accuracy": m.get("accuracy"), "ci": m.get("accuracy_ci95"),
                "truncation_rate": m.get("truncation_rate"), "train_time_s": (res or {}).get("train_runtime_s"),
                "final_nll": None if res is None else res.get("nll_last10", res.get("final_nll")), "nll_key": key,
                "heldout_nll": None if h is None else h["nll_per_token"], **extra}

    base_row = row("base", "base", None)
    rows = [base_row]
    for name in names:
        for seed in seeds:
            res_path = run_dir(out, name, seed) / RESULTS_FILE
            if not res_path.is_file():
                raise FileNotFoundError(f"{res_path}: no such file (the run has not finished)")
            rows.append(row(f"{name} (seed {seed})", f"{name}-s{seed}", json.loads(res_path.read_text()), mode=name))
    baseline_row = base_row if baseline == "base" else next((r for r in rows if r.get("mode") == baseline), base_row)
    base_nll = nll_results.get(baseline_row["nll_key"])
    if base_nll is not None:
        for r in rows:
            if r["nll_key"] in nll_results:
                r["heldout_nll_diff"] = paired_nll_difference(nll_results[r["nll_key"]], base_nll)
                r["heldout_nll_diff_by_category"] = {
                    c: paired_nll_difference(nll_results[r["nll_key"]], base_nll, category=c)
                    for c, summ in base_nll["by_category"].items() if summ["num_tokens"]}
    if len(seeds) > 1:
        rows += [_seed_mean(name, [r for r in rows if r.get("mode") == name]) for name in names]
    md, csv_text = format_rows(rows, baseline_row, train_time=train_time)
    md += format_category_rows(rows, base_nll, baseline_row["nll_key"])
    if len(seeds) > 1:
        md += "\nRows `mean of N seeds`: the mean over seeds, and ± 1 standard deviation across seeds in the interval " \
              "columns.\n"
    return md, csv_text, rows


def main(args: argparse.Namespace) -> int:
    from tokensft.cli.train import parse, precheck

    try:  # everything the sweep will need, checked before its first run (a bad mode must not wait for the others)
        if not Path(args.config).is_file():
            raise ValueError(f"--config {args.config}: no such file")
        variants = [parse_variant(m) for m in args.modes.split(",") if m]
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip() != ""]
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        if not variants or not seeds:
            raise ValueError("--modes and --seeds must name at least one mode and one seed")
        from tokensft.eval.benchmarks import BENCHMARKS

        if not args.skip_accuracy and args.benchmark not in BENCHMARKS:
            raise ValueError(f"--benchmark {args.benchmark!r} is unknown; known: {', '.join(BENCHMARKS)}")
        # the quick checks of `tokensft train` for every variant, before transformers is imported (seconds)
        for spec, (_, scheme, variant_args) in zip(args.modes.split(","), variants):
            try:
                precheck(["--config", args.config, *args.train_args, "--mode", scheme, *variant_args],
                         output_dir=False)
            except ValueError as e:
                raise ValueError(f"--modes {spec}: {e}") from None
        base_cfg, base_model, base_data = parse(["--config", args.config, *args.train_args])
        for spec, (_, scheme, variant_args) in zip(args.modes.split(","), variants):
            try:
                parse(["--config", args.config, *args.train_args, "--mode", scheme, *variant_args])
            except ValueError as e:
                raise ValueError(f"--modes {spec}: {e}") from None
        eval_steps = parse_eval_steps(args.eval_steps, base_cfg)
    except ValueError as e:
        print(f"tokensft sweep: error: {e}", file=sys.stderr)
        return 2
    from tokensft.eval import evaluate
    from tokensft.eval.heldout import heldout_nll
    from tokensft.io import atomic_write
    from tokensft.trainer.run import RESULTS_FILE, train

    modes = [name for name, _, _ in variants]
    out = Path(args.out or base_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_kw = dict(benchmark=args.benchmark, data=args.data, limit=args.limit, max_new_tokens=args.max_new_tokens,
                   batch_size=args.batch_size, threads=args.threads, backend=args.backend)

    def accuracy(model: str, adapter: str | None, name: str) -> None:
        if not args.skip_accuracy:
            evaluate(model, adapter=adapter, output_dir=str(out / "eval" / name), **eval_kw)

    trace_modes = None if args.trace_modes is None else {m for m in args.trace_modes.split(",") if m}
    if trace_modes is not None and not trace_modes <= set(modes):
        print(f"tokensft sweep: error: --trace_modes {sorted(trace_modes - set(modes))} not in --modes {modes}",
              file=sys.stderr)
        return 2

    def score_nll(name: str, adapter: str | None, model: str) -> None:
        if args.nll_data:
            print(f"[sweep] {name}: held-out NLL on {args.nll_data}", flush=True)
            heldout_nll(model, adapter=adapter, data=args.nll_data, split=args.nll_split, limit=args.nll_limit,
                        template=base_data.template, system_prompt=base_data.system_prompt,
                        max_length=base_cfg.max_length or 1024, output_dir=str(out / "nll" / name),
                        threads=args.threads, token_rows=args.nll_token_rows)

    print(f"[sweep] baseline: {base_model.model} (no fine-tuning)", flush=True)
    accuracy(base_model.model, None, "base")
    score_nll("base", None, base_model.model)
    for mode, scheme, variant_args in variants:
        for seed in seeds:
            run = run_dir(out, mode, seed)
            if (run / RESULTS_FILE).exists():
                print(f"[sweep] {mode} seed {seed}: trained already ({run})", flush=True)
            else:
                print(f"[sweep] {mode} seed {seed}: training -> {run}", flush=True)
                no_trace = [] if trace_modes is None or mode in trace_modes else ["--trace_every_n_steps", "0"]
                cfg, model_args, data_args = parse(["--config", args.config, *args.train_args, "--mode", scheme,
                                                    *variant_args, "--seed", str(seed), "--output_dir", str(run),
                                                    "--resume_from_checkpoint", "true",
                                                    *no_trace, *(["--threads", str(args.threads)] if args.threads else [])])
                train(cfg, model_args, data_args).pop("trainer", None)
            for step in [*eval_steps, None]:
                where = run if step is None else run / f"checkpoint-{step}"
                if not where.is_dir():
                    print(f"tokensft sweep: error: {where}: no such checkpoint (--eval_steps {step})", file=sys.stderr)
                    return 2
                print(f"[sweep] {mode} seed {seed}: evaluating" + ("" if step is None else f" step {step}"),
                      flush=True)
                adapter = str(where) if (where / "adapter_config.json").exists() else None
                model = base_model.model if adapter else str(where)
                accuracy(model, adapter, eval_key(mode, seed, step))
                score_nll(eval_key(mode, seed, step), adapter, model)
            _analyze_traces(run)
    md, csv_text, rows = sweep_tables(out, modes, seeds, baseline=args.baseline, accuracy=not args.skip_accuracy,
                                      nll=bool(args.nll_data), train_time=not args.no_train_time)
    atomic_write(out / "results.md", md)
    atomic_write(out / "results.csv", csv_text)
    atomic_write(out / "results.json", json.dumps(rows, indent=2))
    if not args.no_table:
        print("\n" + md)
    print(f"wrote {out / 'results.md'}", file=sys.stderr)
    return 0


STUDY_CATEGORIES = ("number", "operator")  # where the reference study's premise lives (docs/results.md §0)


def _pooled_nll(results: list[dict]) -> dict:
    """One `heldout_nll`-shaped result whose per-sequence (and per-category) sums add up the seeds' `results` on the
    same sequences: a paired difference of two pooled results treats each held-out sequence as one unit, its
    seeds summed (`paired_nll_difference`)."""
    first = results[0]

    def add(lists):
        return [[sum(x[i][0] for x in lists), sum(x[i][1] for x in lists)] for i in range(len(lists[0]))]

    per_seq = add([r["per_sequence"] for r in results])
    tokens = sum(n for _, n in per_seq)
    return {"settings": first.get("settings", {}), "rows": first.get("rows"), "per_sequence": per_seq,
            "nll_per_token": sum(s for s, _ in per_seq) / tokens if tokens else None,
            "per_category": {c: add([r["per_category"][c] for r in results]) for c in first.get("per_category", {})}}


def study_tables(out: Path, names: list[str], seeds: list[int] | dict[str, list[int]], steps: list[int | None], *,
                 baseline: str = "sft", labels: dict[str, str] | None = None) -> tuple[str, list[dict]]:
    """The study's headline table from the summaries a sweep with `--eval_steps` leaves (`OUT/eval/<key>/metrics.json`
    with `per_problem`, `OUT/nll/<key>/heldout_nll.json`, `OUT/<name>-s<seed>/train_results.json`): one row per
    variant and training length, its seeds pooled, each compared with `baseline` at the same length **and on the same
    seeds** (a variant with fewer finished seeds than the baseline is paired with the baseline's runs of those seeds
    only, so both sides of every comparison saw the same batches).

    A first row `base` (steps 0) shows the untouched model when the sweep evaluated it. Columns: accuracy (mean
    over seeds; each seed's in brackets), its 95% Wilson interval over all seeds' samples,
    Δ vs baseline in points, the paired sign test over problems (`paired_sign_test` on each problem's mean outcome
    over the seeds; McNemar's exact test for one seed) with the problems each side wins, truncation, the held-out
    NLL (nats/token, seeds pooled), its paired Δ vs the baseline with a 95% interval (sequences as units,
    `paired_nll_difference`), the same Δ over number and operator tokens only, seconds per optimizer step
    (`seconds_per_step` of the full run; the same for every length) and the seeds pooled.

    Args:
        out: the sweep directory (or a committed copy of its summaries). names: variants in row order (`baseline`
            among them). seeds: seeds pooled in every row, or per variant (`{"sft": [0, 1, 2], "dft": [0]}`; the
            baseline's must include every other variant's). steps: lengths in table order, each an `--eval_steps`
            value or None for the finished run (labelled by its `global_step`). labels: the Method cell per variant
            (default its name; a knob variant reads better as its `--modes` spec, `sft-antiop:antiop_clip_mult=10`).

    Returns:
        `(markdown, rows)`.

    Raises:
        FileNotFoundError: a summary is missing (a run or evaluation has not finished).
        ValueError: a variant has a seed the baseline lacks.
    """
    from tokensft.eval.heldout import HELDOUT_FILE, paired_nll_difference
    from tokensft.eval.metrics import paired_sign_test, wilson_interval
    from tokensft.eval.records import METRICS_FILE
    from tokensft.io import RESULTS_FILE

    seeds_of = {n: list(seeds[n] if isinstance(seeds, dict) else seeds) for n in names}
    for name in names:
        if missing := sorted(set(seeds_of[name]) - set(seeds_of[baseline])):
            raise ValueError(f"{name} has seed(s) {missing} that the baseline {baseline} lacks")

    def read(path: Path) -> dict:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (the run or its evaluation has not finished)")
        return json.loads(path.read_text())

    def fmt_diff(d: dict) -> str:
        return f"{d['mean_diff']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})"

    def pooled(name: str, run_seeds: tuple[int, ...], step: int | None) -> dict:
        keys = [eval_key(name, s, step) for s in run_seeds]
        metrics = [read(out / "eval" / k / METRICS_FILE) for k in keys]
        nll = [read(out / "nll" / k / HELDOUT_FILE) for k in keys]
        trained = [read(run_dir(out, name, s) / RESULTS_FILE) for s in run_seeds]
        samples = sum(m["num_samples"] for m in metrics)
        return {
            "name": name, "steps": step if step is not None else trained[0]["global_step"], "seeds": list(run_seeds),
            "accuracy": statistics.mean(m["accuracy"] for m in metrics),
            "seed_accuracy": [m["accuracy"] for m in metrics],
            "ci": wilson_interval(sum(m["num_correct"] for m in metrics), samples),
            "per_problem": {pid: statistics.mean(m["per_problem"][pid] for m in metrics)
                            for pid in metrics[0]["per_problem"]},
            "num_problems": metrics[0]["num_problems"],
            "truncation_rate": sum(m["num_truncated"] for m in metrics) / samples,
            "nll": _pooled_nll(nll), "step_s": statistics.mean(seconds_per_step(t) for t in trained)}

    rows: list[dict] = []
    if (out / "eval" / "base" / METRICS_FILE).is_file():  # the untouched model, once, as every length's starting point
        m = read(out / "eval" / "base" / METRICS_FILE)
        rows.append({"name": "base", "steps": 0, "accuracy": m["accuracy"], "seed_accuracy": [m["accuracy"]],
                     "seeds": [], "ci": tuple(m["accuracy_ci95"]), "per_problem": m["per_problem"],
                     "truncation_rate": m["truncation_rate"], "num_problems": m["num_problems"],
                     "nll": read(out / "nll" / "base" / HELDOUT_FILE), "step_s": None})
    for step in steps:
        baseline_on: dict[tuple[int, ...], dict] = {}  # the baseline pooled over each seed set a row needs
        for name in names:
            run_seeds = tuple(seeds_of[name])
            r = pooled(name, run_seeds, step)
            if name != baseline:
                if run_seeds not in baseline_on:
                    baseline_on[run_seeds] = pooled(baseline, run_seeds, step)
                base = baseline_on[run_seeds]
                r["baseline_accuracy"] = base["accuracy"]
                r["vs_baseline"] = paired_sign_test(r["per_problem"], base["per_problem"])
                r["nll_diff"] = paired_nll_difference(r["nll"], base["nll"])
                r["nll_diff_by_category"] = {c: paired_nll_difference(r["nll"], base["nll"], category=c)
                                             for c in STUDY_CATEGORIES if c in r["nll"]["per_category"]}
            rows.append(r)
    head = ["Method", "steps", "Acc (%)", "95% CI", f"Δ vs {baseline}", f"wins / {baseline} wins", "p (paired)",
            "truncated (%)", "held-out NLL", f"Δ NLL vs {baseline} (95% CI)",
            *(f"Δ NLL {c}s" for c in STUDY_CATEGORIES), "s/step", "seeds"]
    md = "| " + " | ".join(head) + " |\n|" + "|".join(" --- " for _ in head) + "|\n"
    for r in rows:
        seed_acc = ", ".join(f"{100 * a:.1f}" for a in r["seed_accuracy"])
        vs = r.get("vs_baseline")
        cells = [(labels or {}).get(r["name"], r["name"]), str(r["steps"]),
                 f"{100 * r['accuracy']:.1f}" + (f" ({seed_acc})" if len(r["seeds"]) > 1 else ""),
                 f"{100 * r['ci'][0]:.1f}–{100 * r['ci'][1]:.1f}",
                 "" if vs is None else f"{100 * (r['accuracy'] - r['baseline_accuracy']):+.1f}",
                 "" if vs is None else f"{vs['result_better']} / {vs['baseline_better']}",
                 "" if vs is None else (f"{vs['p']:.1e}" if vs["p"] < 1e-3 else f"{vs['p']:.3f}"),
                 f"{100 * r['truncation_rate']:.0f}", f"{r['nll']['nll_per_token']:.4f}",
                 "" if vs is None else fmt_diff(r["nll_diff"]),
                 *("" if vs is None or c not in r["nll_diff_by_category"] else fmt_diff(r["nll_diff_by_category"][c])
                   for c in STUDY_CATEGORIES),
                 "" if r["step_s"] is None else f"{r['step_s']:.2f}", ",".join(map(str, r["seeds"]))]
        md += "| " + " | ".join(cells) + " |\n"
    for r in rows:  # the per-problem and per-sequence detail stays in the summaries
        r.pop("per_problem")
        r["nll"] = r["nll"]["nll_per_token"]
    return md, rows
