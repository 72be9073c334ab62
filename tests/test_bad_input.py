"""Issue 31, item 8: every bad-input case (`tests/bad_input.CASES`) is refused with exit code 2 and exactly one line
on stderr naming the option, file or row, without a traceback, and leaves the folder exactly as it was. The cases
marked early are refused before transformers is imported. How long each takes is `benchmarks/bench_first_error.py`'s
business, not this test's."""

from __future__ import annotations

import pytest

from tests.bad_input import CASES, make_fixtures, run_case, snapshot


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback_and_nothing_on_disk(tmp_path, case):
    folder = make_fixtures(tmp_path)
    before = snapshot(folder)
    res = run_case(case, folder)
    err = res["stderr_lines"]
    assert res["rc"] == 2, err
    assert len(err) == 1 and ": error: " in err[0] and case.message in err[0], err
    assert "Traceback" not in err[0]
    assert snapshot(folder) == before  # nothing created, changed or removed
    if case.early:
        assert res["transformers_imported"] is False, "refused only after transformers was imported"


def test_every_case_has_a_unique_id_and_each_verb_is_covered():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    verbs = {c.argv[0] if c.argv[0] != "eval" or c.argv[1].startswith("--") else f"eval {c.argv[1]}" for c in CASES}
    assert verbs >= {"train", "ref-cache", "eval", "eval nll", "eval compare", "sweep", "demo"}
