"""`tokensft.runtime.pick_threads`: the thread count per phase, chosen by measurement unless set explicitly."""

import pytest

from tokensft.runtime import MIN_GAIN, pick_threads
from tokensft.runtime import _busy_cores as real_busy_cores  # bound before the fixture below replaces it


def fake_probe(times: dict[int, list[float]], calls: list):
    """A probe returning the next scripted time for each thread count, recording the call order."""
    it = {t: iter(v) for t, v in times.items()}

    def probe(phase, threads):
        calls.append(threads)
        return next(it[threads])
    return probe


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("tokensft.runtime._busy_cores", lambda window_s=0.1: 0.0)  # a quiet machine unless said


def test_cores_busy_with_other_processes_are_not_offered():
    """Another process on one of 2 cores: 1 thread without probing (a thread sharing a busy core stalls all of
    them); on 4 cores with one busy, the probe weighs 1 against 3."""
    calls = []
    assert pick_threads("decode", cores=2, load=1.0, probe=fake_probe({}, calls)) == (
        1, "1.0 of 2 cores busy with other processes")
    assert calls == []
    n, _ = pick_threads("train", cores=4, load=1.1, rounds=1, probe=fake_probe({1: [3e-3], 3: [1e-3]}, calls))
    assert n == 3 and calls == [1, 3]
    assert pick_threads("train", cores=2, load=0.3, rounds=1, probe=fake_probe({1: [2e-3], 2: [1e-3]}, []))[0] == 2


def test_busy_cores_reads_proc_stat(monkeypatch, tmp_path):
    """Two /proc/stat snapshots: 800 jiffies passed, 600 of them idle -> a quarter of 2 CPUs busy = 0.5 cores."""
    import builtins

    stats = iter(["cpu  100 0 100 700 100 0 0 0 0 0\n", "cpu  200 0 200 1300 100 0 0 0 0 0\n"])
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path == "/proc/stat":
            f = tmp_path / "stat"
            f.write_text(next(stats))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert real_busy_cores(0.0) == pytest.approx(0.5)


def test_small_matmuls_that_stall_on_more_threads_get_one():
    calls = []
    n, why = pick_threads("decode", cores=2, rounds=3, probe=fake_probe({1: [1e-3] * 3, 2: [3e-3] * 3}, calls))
    assert n == 1 and "1.00 ms with 1 thread, 3.00 ms with 2" in why
    assert calls == [1, 2, 1, 2, 1, 2]  # interleaved, so both see the same load


def test_large_matmuls_that_scale_get_every_core():
    assert pick_threads("train", cores=4, rounds=3, probe=fake_probe({1: [4e-3] * 3, 4: [1.2e-3] * 3}, []))[0] == 4


def test_more_threads_must_win_by_the_margin():
    just_under = 1e-3 / (MIN_GAIN * 0.99)  # 1 thread is 1.19x slower: not enough to take both cores
    assert pick_threads("train", cores=2, rounds=3, probe=fake_probe({1: [1e-3] * 3, 2: [just_under] * 3}, []))[0] == 1
    clearly = 1e-3 / (MIN_GAIN * 1.2)
    assert pick_threads("train", cores=2, rounds=3, probe=fake_probe({1: [1e-3] * 3, 2: [clearly] * 3}, []))[0] == 2


def test_each_count_is_judged_by_its_median_round():
    # one slow round for 1 thread (another job woke up) does not decide: median 1.0 ms against 1.5 ms ...
    probe = fake_probe({1: [5e-3, 1e-3, 1e-3], 2: [1.5e-3] * 3}, [])
    assert pick_threads("train", cores=2, rounds=3, probe=probe)[0] == 1
    # ... and neither does one lucky round for 2 threads that stall in the others (seen on this loaded box)
    probe = fake_probe({1: [1e-3] * 3, 2: [0.3e-3, 24e-3, 20e-3]}, [])
    assert pick_threads("decode", cores=2, rounds=3, probe=probe)[0] == 1


def test_explicit_choices_win_and_skip_the_probe(monkeypatch):
    import torch

    def never(*a):
        raise AssertionError("probed although the count was given")
    assert pick_threads("decode", requested=3, cores=2, probe=never) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert pick_threads("train", cores=2, probe=never) == (torch.get_num_threads(), "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert pick_threads("train", cores=1, probe=never) == (1, "one core")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="phase"):
        pick_threads("prefill", cores=2)
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        pick_threads("train", requested=-1)


def test_the_real_probe_times_a_matmul():
    import torch

    from tokensft.runtime import _probe_seconds

    before = torch.get_num_threads()
    try:
        s = _probe_seconds("decode", 1, budget_s=0.01)
        assert 0 < s < 1.0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_config_rejects_negative_threads(tmp_path):
    from tokensft.trainer.config import TokenSFTConfig

    with pytest.raises(ValueError, match="--threads must be an integer >= 0"):
        TokenSFTConfig(output_dir=str(tmp_path), threads=-2, report_to="none", use_cpu=True)
