"""A run never writes over a user's files: an `--output_dir` that is, contains or lies inside the model (or is the
data's folder, or overlaps the cache) is refused in one line before anything is created, and two trainings into one
directory cannot run at once (issue 31, item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokensft.io import LOCK_FILE, InputError, dir_lock
from tokensft.trainer.outputs import check_output_dir


def test_output_dir_overlapping_the_inputs_is_refused(tmp_path):
    model = tmp_path / "base"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    cache = tmp_path / "cache"
    inputs = {"--model": str(model), "--ref_model_name_or_path": None, "--dataset": str(data)}
    for out, why in ((model, "is --model"), (model / "run", "lies inside --model"), (tmp_path, "contains --model"),
                     (data.parent, "contains --dataset"), (cache / "x", "overlaps the model cache")):
        with pytest.raises(InputError, match=why):
            check_output_dir(out, inputs=inputs, caches={"the model cache": cache})
    check_output_dir(tmp_path / "runs" / "a", inputs=inputs, caches={"the model cache": cache})  # beside them: fine
    check_output_dir(data.parent / "runs" / "a", inputs={**inputs, "--model": "org/hub-id"})  # next to the data: fine
    assert (model / "model.safetensors").read_bytes() == b"weights" and not (model / "run").exists()


def test_full_finetune_into_the_model_dir_is_refused_before_loading(tmp_path):
    """The measured case: `--output_dir` = `--model` of a full fine-tune overwrote the base weights, exit 0."""
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    code = ("import sys; from tokensft.cli.main import main; rc = main(['train', *sys.argv[1:]]); "
            "print(rc, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "--model", str(model), "--output_dir", str(model),
                           "--dataset", "builtin:arithmetic"], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and f"--output_dir {model} is --model {model}" in err[0], proc.stderr
    assert proc.stdout.split() == ["2", "False"]
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "model.safetensors").read_bytes() == b"weights"


def test_dir_lock_refuses_a_second_live_process_and_takes_over_a_dead_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    with dir_lock(out):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(InputError, match=rf"is in use: process {os.getpid()} on "):
            with dir_lock(out):
                pass
        assert (out / LOCK_FILE).exists()  # the refused attempt left the holder's lock alone
        (out / "checkpoint-1").mkdir()
    assert not (out / LOCK_FILE).exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": os.uname().nodename}))
    with dir_lock(out):  # killed holder: taken over
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(InputError, match="process 1 on another-machine"):  # a live job elsewhere: refused
        with dir_lock(out):
            pass
    old = os.path.getmtime(out / LOCK_FILE) - 3600
    os.utime(out / LOCK_FILE, (old, old))
    with dir_lock(out):  # not touched for an hour: a killed job on another machine, taken over
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with dir_lock(fresh):
            raise RuntimeError("bad data")
    assert not fresh.exists()  # a directory the lock created and nothing filled is removed again
    monkeypatch.setenv("RANK", "1")
    with dir_lock(out):  # other ranks of a job train into the directory rank 0 holds
        assert not (out / LOCK_FILE).exists()


def test_a_folder_that_is_not_a_run_is_refused_even_with_overwrite_and_overwrite_keeps_the_users_files(tmp_path):
    """Measured: `--overwrite_output_dir true` on a user's folder deleted its `traces/` and `checkpoint-*/`."""
    from tokensft.trainer.outputs import plan_output_dir

    mine = tmp_path / "mine"
    (mine / "traces").mkdir(parents=True)
    (mine / "checkpoint-3").mkdir()
    (mine / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"is not empty and is not a tokensft run \(it holds checkpoint-3, notes"):
            plan_output_dir(mine, resume=None, overwrite=overwrite, max_steps=4)
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoint-3", "notes.txt", "traces"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_FILE).write_text("{}")  # the lock this run took: still an empty folder
    assert plan_output_dir(empty, resume=None, overwrite=False, max_steps=4) == {"action": "train", "resume": None}
    run = tmp_path / "run"  # a tokensft run: overwrite removes what tokensft wrote, nothing else
    for d in ("checkpoint-2", "traces", "my-notes"):
        (run / d).mkdir(parents=True)
    for f in ("tokensft_config.yaml", "train_results.json", "train_segments.json", "my-notes/a.txt"):
        (run / f).write_text("{}")
    with pytest.raises(InputError, match="holds a finished run"):
        plan_output_dir(run, resume=None, overwrite=False, max_steps=4, apply=False)
    assert plan_output_dir(run, resume=None, overwrite=True, max_steps=4, apply=False)["action"] == "train"
    assert len(list(run.iterdir())) == 6  # apply=False (the CLI's precheck) removes nothing
    plan_output_dir(run, resume=None, overwrite=True, max_steps=4)
    assert sorted(p.name for p in run.iterdir()) == ["my-notes", "tokensft_config.yaml"]


def test_train_into_a_users_folder_is_refused_in_one_line_before_loading(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "draft.md").write_text("keep")
    code = ("import sys; from tokensft.cli.main import main; rc = main(['train', *sys.argv[1:]]); "
            "print(rc, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "--output_dir", str(mine), "--overwrite_output_dir", "true"],
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "is not empty and is not a tokensft run (it holds draft.md)" in err[0], proc.stderr
    assert proc.stdout.split() == ["2", "False"]
    assert [p.name for p in mine.iterdir()] == ["draft.md"]
