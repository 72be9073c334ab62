"""Every bad-input case of issue 31 as one table: the command line, a piece of the one line it must print, and whether
that line must come before transformers is imported. `tests/test_bad_input.py` asserts each (exit code 2, exactly one
line on stderr, no traceback, nothing created or changed on disk); `benchmarks/bench_first_error.py` times each case's
first error line. Both build the same fixture folder with `make_fixtures` and run a case with `run_case`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = str(REPO / "configs" / "arithmetic-study.yaml")


@dataclass(frozen=True)
class Case:
    """One bad command line. `early`: refused before transformers, TRL or PEFT are imported (the sub-second checks);
    otherwise right after the full option parse (TrlParser), before any model loads."""

    id: str
    argv: tuple[str, ...]
    message: str
    early: bool = True


def _chat(role: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": json.loads(role), "content": "hi"},
                                    {"role": "assistant", "content": answer}]}) + "\n"


FIXTURES: dict[str, bytes] = {  # relative path -> content, written into the working folder of every case
    "bad.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n',
    "latin1.jsonl": b'{"prompt": "caf\xe9", "completion": "b"}\n',
    "bad.yaml": b"mode: sft\nmax_steps: [1\n",
    "typo.yaml": b"mode: sft\nlerning_rate: 1.0e-4\n",
    "typed.yaml": b"mode: sft\nuse_peft: true\nlora_r: 0\n",
    "empty.jsonl": b"",
    "missing.jsonl": b'{"problem": "1 + 1?"}\n',
    "role.jsonl": (_chat('"user"', "ok") + _chat("1", "ok")).encode(),
    "nocompletion.jsonl": _chat('"user"', " ").encode(),
    "broken.py": b"def (:\n",
    "raises.py": b"x = 1\nraise RuntimeError('boom')\n",
    "base/config.json": b"{}",
    "base/model.safetensors": b"weights",
    "mine/draft.md": b"a user's own file",
    "finished/tokensft_config.yaml": b"mode: sft\n",
    "finished/train_results.json": b'{"global_step": 6}',
    "noeval/notes.txt": b"no metrics.json here",
}

TRAIN = ("--output_dir", "out")
CASES: list[Case] = [
    # tokensft train: options
    Case("mode-unknown", ("train", "--mode", "bogus", *TRAIN), "--mode 'bogus' is unknown; choose one of sft, dft"),
    Case("topk-range", ("train", "--topk_keep_ratio", "1.5", *TRAIN), "--topk_keep_ratio must be in (0, 1], got 1.5"),
    Case("antiop-range", ("train", "--antiop_clip_mult", "-1", *TRAIN), "--antiop_clip_mult must be > 0, got -1"),
    Case("max-length-0", ("train", "--max_length", "0", *TRAIN), "--max_length must be an integer >= 1"),
    Case("lora-r-negative", ("train", "--lora_r", "-4", *TRAIN), "--lora_r must be an integer >= 1, got -4"),
    Case("lora-r-zero", ("train", "--lora_r", "0", *TRAIN), "--lora_r must be an integer >= 1, got 0"),
    Case("trace-every-negative", ("train", "--trace_every_n_steps", "-1", *TRAIN),
         "--trace_every_n_steps must be an integer >= 0"),
    Case("model-missing", ("train", "--model", "/nonexistent/model", *TRAIN), "--model /nonexistent/model: no such file"),
    Case("scheme-file-syntax", ("train", "--scheme_files", "broken.py", *TRAIN),
         "--scheme_files: broken.py:1: syntax error"),
    Case("scheme-file-raises", ("train", "--scheme_files", "raises.py", *TRAIN),
         "raises.py:2: importing it raised RuntimeError: boom"),
    Case("config-unreadable", ("train", "--config", "missing.yaml", *TRAIN), "--config missing.yaml: cannot read it"),
    Case("config-not-yaml", ("train", "--config", "bad.yaml", *TRAIN), "bad.yaml:3: not valid YAML"),
    # tokensft train: data
    Case("data-missing", ("train", "--dataset", "missing/train.jsonl", *TRAIN),
         "--dataset missing/train.jsonl: no such file"),
    Case("data-bad-json", ("train", "--dataset", "bad.jsonl", *TRAIN), "bad.jsonl:2: invalid JSON on line 2"),
    Case("data-not-utf8", ("train", "--dataset", "latin1.jsonl", *TRAIN), "latin1.jsonl:1: not UTF-8 text"),
    Case("data-empty", ("train", "--dataset", "empty.jsonl", *TRAIN), "empty.jsonl: no rows to build a training set"),
    Case("data-missing-field", ("train", "--dataset", "missing.jsonl", "--dataset_preset", "math", *TRAIN),
         "missing.jsonl:1: field 'solution' is missing"),
    Case("data-role-not-string", ("train", "--dataset", "role.jsonl", *TRAIN),
         "role.jsonl:2: field 'messages[0].role' must be a non-empty string"),
    Case("data-no-completion", ("train", "--dataset", "nocompletion.jsonl", *TRAIN),
         "all 1 rows have an empty completion"),
    # tokensft train: a user's files
    Case("output-is-model", ("train", "--model", "base", "--output_dir", "base"), "--output_dir base is --model base"),
    Case("output-inside-model", ("train", "--model", "base", "--output_dir", "base/run"), "lies inside --model base"),
    Case("output-users-folder", ("train", "--output_dir", "mine", "--overwrite_output_dir", "true"),
         "--output_dir mine is not empty and is not a tokensft run (it holds draft.md)"),
    Case("output-finished-run", ("train", "--output_dir", "finished"),
         "--output_dir finished holds a finished run (step 6"),
    # tokensft train: early once any run has saved this TRL's option names (tokensft.cli.train.check_config_keys),
    # else found by the full option parse (TRL imported); before any model loads either way
    Case("config-unknown-key", ("train", "--config", "typo.yaml", *TRAIN),
         "typo.yaml: unknown key 'lerning_rate' (did you mean learning_rate?)", early=False),
    Case("learning-rate-type", ("train", "--learning_rate", "abc", *TRAIN),
         "--learning_rate must be a number >= 0, got 'abc'"),
    Case("batch-size-zero", ("train", "--per_device_train_batch_size", "0", *TRAIN),
         "--per_device_train_batch_size must be an integer >= 1, got 0"),
    Case("lora-dropout-range", ("train", "--lora_dropout", "1.5", *TRAIN), "--lora_dropout must be in [0, 1), got 1.5"),
    Case("template-choice", ("train", "--template", "jinja", *TRAIN), "--template must be one of auto, chat, plain"),
    Case("trace-choice", ("train", "--trace_token_norms", "fast", *TRAIN),
         "--trace_token_norms must be one of exact, projection, brute"),
    Case("yaml-typed-value", ("train", "--config", "typed.yaml", *TRAIN), "--lora_r must be an integer >= 1, got 0"),
    Case("trl-unhonoured", ("train", "--dataset_num_proc", "4", *TRAIN), "--dataset_num_proc 4 is not supported"),
    Case("trl-packing", ("train", "--packing", "true", *TRAIN), "--packing True is not supported"),
    # tokensft ref-cache (the same checks as train)
    Case("ref-cache-mode", ("ref-cache", "--mode", "bogus", "--ref_cache_dir", "out"), "--mode 'bogus' is unknown"),
    Case("ref-cache-data", ("ref-cache", "--dataset", "bad.jsonl", "--ref_cache_dir", "out"),
         "bad.jsonl:2: invalid JSON"),
    # tokensft eval
    Case("eval-limit", ("eval", "--model", "smollm2-135m-instruct", "--limit", "-1"),
         "argument --limit: must be an integer >= 1"),
    Case("eval-batch-size", ("eval", "--model", "smollm2-135m-instruct", "--batch_size", "0"),
         "argument --batch_size: must be an integer"),
    Case("eval-threads", ("eval", "--model", "smollm2-135m-instruct", "--threads", "-1"),
         "argument --threads: must be an integer >= 0"),
    Case("eval-adapter-missing", ("eval", "--model", "smollm2-135m-instruct", "--adapter", "/nonexistent",
                                  "--output_dir", "out"), "--adapter /nonexistent: no such directory"),
    Case("eval-model-missing", ("eval", "--model", "/no/such/model", "--output_dir", "out"),
         "--model /no/such/model: no such file"),
    Case("eval-benchmark", ("eval", "--model", "smollm2-135m-instruct", "--benchmark", "bogus"),
         "argument --benchmark: invalid choice"),
    Case("eval-nll-not-adapter", ("eval", "nll", "--model", "smollm2-135m-instruct", "--adapter", "mine",
                                  "--data", "x.jsonl"), "not a PEFT adapter directory"),
    Case("eval-nll-threads", ("eval", "nll", "--model", "m", "--data", "d.jsonl", "--threads", "-1"),
         "argument --threads: must be an integer >= 0"),
    Case("eval-compare-no-metrics", ("eval", "compare", "noeval", "--baseline", "noeval"), "No metrics.json in noeval"),
    # tokensft sweep: every mode, seed, benchmark and scheme argument before its first run
    Case("sweep-no-config", ("sweep", "--out", "out"), "the following arguments are required: --config"),
    Case("sweep-limit", ("sweep", "--config", STUDY, "--limit", "0", "--out", "out"),
         "argument --limit: must be an integer >= 1"),
    Case("sweep-seeds", ("sweep", "--config", STUDY, "--seeds", "a", "--out", "out"),
         "--seeds 'a': expected comma-separated integers"),
    Case("sweep-mode", ("sweep", "--config", STUDY, "--modes", "sft,sft-topx", "--out", "out"),
         "--modes sft-topx: --mode 'sft-topx' is unknown"),
    Case("sweep-benchmark", ("sweep", "--config", STUDY, "--benchmark", "bogus", "--out", "out"),
         "--benchmark 'bogus' is unknown"),
    Case("sweep-scheme-arg", ("sweep", "--config", STUDY, "--modes", "sft,sft-topk:topk_keep_ratio=2", "--out", "out"),
         "--modes sft-topk:topk_keep_ratio=2: --topk_keep_ratio must be in (0, 1], got 2"),
    Case("sweep-threads", ("sweep", "--config", STUDY, "--threads", "-1", "--out", "out"),
         "argument --threads: must be an integer >= 0"),
    Case("demo-threads", ("demo", "--threads", "-1", "--output_dir", "out"), "argument --threads: must be an integer"),
]


def make_fixtures(folder: str | os.PathLike) -> Path:
    """Write `FIXTURES` into `folder` (created); returns it."""
    folder = Path(folder)
    for rel, data in FIXTURES.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def snapshot(folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """`{relative path: (size, mtime_ns)}` of every file and folder under `folder`: equal before and after a case
    when it created, changed and removed nothing."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


CODE = ("import sys; from tokensft.cli.main import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('RESULT', rc, 'transformers' in sys.modules, flush=True)\nsys.exit(rc)")


def run_case(case: Case, folder: str | os.PathLike, *, timeout: float = 180) -> dict:
    """Run `tokensft <case.argv>` in a fresh Python process in `folder` (offline).

    Returns:
        `{"rc", "stderr_lines", "seconds" (wall time to exit, s), "transformers_imported" (bool or None)}`.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TOKENSFT_DEBUG", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CODE, *case.argv], capture_output=True, text=True, cwd=folder,
                          env=env, timeout=timeout)
    seconds = time.perf_counter() - t0
    result = next((line.split() for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    return {"rc": proc.returncode, "stderr_lines": proc.stderr.strip().splitlines(), "seconds": seconds,
            "transformers_imported": None if result is None else result[2] == "True"}
