"""A run's output directory across crashes: which checkpoint to resume from, whether the run is finished, and the
final save that appears whole or not at all.

Layout of `OUTPUT_DIR` (what `tokensft.trainer.run.train` writes):

    tokensft_config.yaml      the exact configuration (written before training starts)
    checkpoint-N/             transformers checkpoints (`--save_strategy steps`); `trainer_state.json` is written last
    traces/                   per-token gradient traces (`--trace_every_n_steps`)
    adapter_model.safetensors / model.safetensors, tokenizer files   the final model, moved in from `.final.tmp/`
    train_results.json        written last, atomically: its presence is what marks the run as finished

transformers writes `checkpoint-N/` in place and resumes from the highest N, so a kill during a checkpoint save
leaves a torn `checkpoint-N` that `resume_from_checkpoint=True` then dies on. Here a checkpoint counts only when it is
complete (`checkpoint_problem`), and resume takes the newest complete one and says which and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..io import LOCK_FILE, RESULTS_FILE, RUN_CONFIG_FILE, InputError, atomic_write

logger = logging.getLogger("tokensft.train")

__all__ = ["CHECKPOINT_RE", "FINAL_TMP", "LOCK_FILE", "SEGMENTS_FILE", "check_output_dir", "checkpoint_problem",
           "config_changes", "foreign_entries", "list_checkpoints", "newest_complete_checkpoint", "plan_output_dir",
           "publish_final", "read_segments", "write_segments"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL_TMP = ".final.tmp"
SEGMENTS_FILE = "train_segments.json"  # [{start_step, end_step, runtime_s, changed, config}] of every segment
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, path)` of every `checkpoint-N` directory in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it is complete.

    Complete means: `trainer_state.json` (the last file transformers writes) parses as a JSON object whose
    `global_step` equals the directory's N, and a model or adapter weights file is there and not empty, or FSDP's
    sharded model state (`pytorch_model_fsdp_0/` with the `.metadata` that torch.distributed.checkpoint writes last)."""
    p = Path(path)
    state = p / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save was interrupted)"
    try:
        obj = json.loads(state.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is torn (the save was interrupted)"
    m = CHECKPOINT_RE.match(p.name)
    if not isinstance(obj, dict) or (m and obj.get("global_step") != int(m.group(1))):
        return f"trainer_state.json says step {obj.get('global_step') if isinstance(obj, dict) else '?'}"
    if not any((p / w).is_file() and (p / w).stat().st_size > 0 for w in WEIGHT_FILES) \
            and not any((d / ".metadata").is_file() for d in p.glob("pytorch_model_fsdp_*")):
        return "no model or adapter weights"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of `output_dir` (None if there is none) and the newer ones skipped, each with
    the reason (`checkpoint_problem`)."""
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _finished(out: Path) -> dict | None:
    try:
        res = json.loads((out / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) else None


def foreign_entries(output_dir: str | os.PathLike) -> list[str]:
    """Names in an existing `output_dir` that show it is not a tokensft run: [] when it is missing, empty (but for
    tokensft's lock and temporary save), or holds `tokensft_config.yaml` (written when a tokensft training starts);
    else its entries, sorted (at most 5)."""
    out = Path(output_dir)
    if not out.is_dir() or (out / RUN_CONFIG_FILE).is_file():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in (LOCK_FILE, FINAL_TMP))[:5]


def plan_output_dir(output_dir: str | os.PathLike, *, resume, overwrite: bool, max_steps: int,
                    apply: bool = True) -> dict:
    """Decide, before anything loads, what a `tokensft train` into `output_dir` does.

    Args:
        output_dir: the run directory.
        resume: `--resume_from_checkpoint`: None/False (start), True (the newest complete checkpoint) or a path.
        overwrite: `--overwrite_output_dir`: start again over an existing run (its checkpoints, traces and results
            are removed: only what tokensft wrote there).
        max_steps: the run's target step count (`--max_steps`; ≤ 0: set by epochs).
        apply: False to decide only (the CLI's precheck): nothing on disk is removed.

    Returns:
        `{"action": "train", "resume": path-or-None}`, or `{"action": "done", "results": dict}` when the run already
        finished (its `train_results.json` reaches `max_steps`) and `resume` asks to continue it: nothing to do.

    Raises:
        InputError: the directory holds a run and neither `resume` nor `overwrite` was given (names what is there and
            both ways out); `resume` names a path that is not a complete checkpoint; the directory exists, is not
            empty and is not a tokensft run (refused even with `overwrite`: its files are the user's), unless `resume`
            continues a complete checkpoint in it.
    """
    out = Path(output_dir)

    def refuse_foreign() -> None:
        foreign = foreign_entries(out)
        if foreign:
            raise InputError(f"--output_dir {out} is not empty and is not a tokensft run (it holds "
                             f"{', '.join(foreign)}{', ...' if len(foreign) == 5 else ''}): tokensft writes only into a "
                             "new or empty directory or one of its own runs, even with --overwrite_output_dir; choose "
                             "another --output_dir")
    checkpoints = list_checkpoints(out)
    results = _finished(out)
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    if resume and resume is not True:
        problem = checkpoint_problem(resume) if Path(resume).is_dir() else "no such directory"
        if problem:
            raise InputError(f"--resume_from_checkpoint {resume}: not a complete checkpoint: {problem}")
        return {"action": "train", "resume": str(resume)}
    if resume:
        if results is not None and (max_steps <= 0 or int(results.get("global_step") or 0) >= max_steps):
            return {"action": "done", "results": results}
        ckpt, skipped = newest_complete_checkpoint(out)
        for path, why in skipped:
            logger.warning("skipping %s: %s", path, why)
        if ckpt is None:
            log = logger.warning if skipped or (out / RUN_CONFIG_FILE).exists() else logger.info
            refuse_foreign()
            log("--resume_from_checkpoint: no complete checkpoint in %s; training from step 0", out)
            if apply:
                _clear(out)
            return {"action": "train", "resume": None}
        logger.info("resuming from %s (the newest complete checkpoint)", ckpt)
        return {"action": "train", "resume": str(ckpt)}
    refuse_foreign()
    if (results is not None or checkpoints) and not overwrite:
        what = (f"a finished run (step {results.get('global_step')}, {RESULTS_FILE})" if results is not None
                else f"an unfinished run ({len(checkpoints)} checkpoint(s), newest {checkpoints[-1][1].name})")
        raise InputError(f"--output_dir {out} holds {what}: pass --resume_from_checkpoint true to continue it, "
                         "--overwrite_output_dir true to train again from scratch, or another --output_dir")
    if apply and (overwrite or (out / RUN_CONFIG_FILE).exists()):
        _clear(out)
    return {"action": "train", "resume": None}


def config_changes(old: dict, new: dict, keys) -> dict[str, tuple]:
    """The keys of `keys` whose value differs between a run's saved configuration `old` and the resuming one `new`
    (both as `tokensft.trainer.run.config_dict` gives them), as `{key: (old, new)}` in `keys` order. Paths that exist
    compare resolved (`data/x.jsonl` from the run's parent equals its absolute path); lists compare as lists."""
    changed = {}
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if a == b:
            continue
        if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists() \
                and Path(a).resolve() == Path(b).resolve():
            continue
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and not isinstance(b, bool) and float(a) == float(b):
            continue
        changed[key] = (a, b)
    return changed


def read_segments(output_dir: str | os.PathLike) -> list[dict]:
    """The training segments of a run (`train_segments.json`: one per `tokensft train` into it, a resume starting a
    new one): `[{"start_step", "end_step", "runtime_s", "changed", "config"}]`; [] when there is none or it is
    unreadable."""
    try:
        obj = json.loads((Path(output_dir) / SEGMENTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return obj if isinstance(obj, list) and all(isinstance(x, dict) for x in obj) else []


def write_segments(output_dir: str | os.PathLike, segments: list[dict]) -> None:
    """Write `train_segments.json` atomically (readers never see half of it)."""
    atomic_write(Path(output_dir) / SEGMENTS_FILE, json.dumps(segments, indent=1, default=str) + "\n")


def _clear(out: Path) -> None:
    """Remove what an earlier run left that a fresh start would mix with its own: checkpoints, traces, the final
    results and a half-moved final save (the model files themselves are overwritten by the final save)."""
    for _, path in list_checkpoints(out):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("traces", FINAL_TMP):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (RESULTS_FILE, SEGMENTS_FILE):
        (out / name).unlink(missing_ok=True)


def publish_final(tmp: str | os.PathLike, output_dir: str | os.PathLike) -> list[str]:
    """Move the files of a finished final save (`OUTPUT_DIR/.final.tmp/`) into `output_dir` (`os.replace`, same
    file system) and remove `tmp`. Called before `train_results.json` is written: a kill in between leaves a run
    without `train_results.json`, which consumers refuse as incomplete. Returns the names moved."""
    tmp, out = Path(tmp), Path(output_dir)
    moved = []
    for f in sorted(tmp.iterdir()):
        dest = out / f.name
        if dest.is_dir() and not f.is_dir():
            shutil.rmtree(dest)
        elif f.is_dir() and dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(f, dest)
        moved.append(f.name)
    tmp.rmdir()
    return moved


def check_output_dir(output_dir: str | os.PathLike, *, inputs: dict[str, str | None],
                     caches: dict[str, str | os.PathLike] | None = None) -> None:
    """Refuse an `--output_dir` that would write over a user's files, before anything is created.

    Args:
        output_dir: the run directory.
        inputs: flag name → local path it names (`--model`, `--ref_model_name_or_path`, `--dataset`; non-paths such as
            hub ids, and None, are ignored): the output may not be such a path, contain it, or lie inside it when it
            is a model directory (a full fine-tune's final save would overwrite `model.safetensors` in place). A data
            file's folder may hold runs (`data.jsonl` next to `runs/`), but not be one.
        caches: name → directory (tokensft's model cache): the output may not be, contain or lie inside it.

    Raises:
        InputError: one line naming the flag and the path.
    """
    out = Path(output_dir).expanduser().resolve()

    def inside(a: Path, b: Path) -> bool:
        return a == b or b in a.parents

    for flag, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        p = Path(value).expanduser().resolve()
        if inside(p, out):
            raise InputError(f"--output_dir {output_dir} {'is' if p == out else 'contains'} {flag} {value}: the run "
                             "would write over it; choose another --output_dir")
        if p.is_dir() and flag != "--dataset" and inside(out, p):
            raise InputError(f"--output_dir {output_dir} lies inside {flag} {value}: the run would write into the "
                             "model's files; choose an --output_dir outside it")
    for name, value in (caches or {}).items():
        p = Path(value).expanduser().resolve()
        if inside(p, out) or inside(out, p):
            raise InputError(f"--output_dir {output_dir} overlaps {name} {value}; choose another --output_dir")
