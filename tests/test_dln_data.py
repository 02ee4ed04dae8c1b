"""BBH reconstruction from the bigbench sdist: a synthetic sdist built here, then the real one (checksums)."""
import io
import json
import re
import tarfile

import numpy as np
import pytest

from mops_kernels.dln import data

ROOT = "bigbench-9.9/bigbench/benchmark_tasks"


def _add(tar, name, obj):
    raw = json.dumps(obj).encode()
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def _nav(i):
    return {"input": f"Take {i} steps. Turn around.", "target_scores": {"True": i % 3 == 0, "False": i % 3 != 0}}


def _hyp(i):
    good, bad = f"big old {i} red box", f"red old big {i} box"
    pair = (good, bad) if i % 2 else (bad, good)
    return {"input": f'Which sentence has the correct adjective order: a " {pair[0]} " b " {pair[1]} " ?',
            "target_scores": {"a": int(i % 2 == 1), "b": int(i % 2 == 0)}}


def _ld7(i):
    names = "ABCDEFG"
    return {"input": f"Seven birds {i}.", "target_scores": {f"Bird {c} is first.": int(j == i % 7)
                                                           for j, c in enumerate(names)}}


@pytest.fixture
def sdist(tmp_path):
    path = tmp_path / "bigbench-9.9.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, f"{ROOT}/navigate/task.json", {"examples": [_nav(i) for i in range(11)]})
        _add(tar, f"{ROOT}/hyperbaton/task.json", {"examples": [_hyp(i) for i in range(13)]})
        _add(tar, f"{ROOT}/logical_deduction/seven_objects/task.json", {"examples": [_ld7(i) for i in range(9)]})
        _add(tar, f"{ROOT}/logical_deduction/task.json", {"examples": [_ld7(i) for i in range(2)]})
        _add(tar, f"{ROOT}/sports_understanding/task.json",
             {"examples": [{"input": f"Player {i} scored", "target_scores": {"plausible": i % 2, "implausible": 1 - i % 2}}
                           for i in range(7)]})
    return str(path)


TEST_IDX = {"navigate": [7, 2, 9], "hyperbaton": [12, 0, 5, 3], "logical_deduction_seven_objects": [4, 1],
            "sports_understanding": [6, 0]}


@pytest.fixture
def index_file(tmp_path, sdist):
    digests = {}
    for t, idx in TEST_IDX.items():
        ex = data.read_task_examples(sdist, t)
        digests[t] = data.test_digest([dict(zip(("input", "target"), data.TASKS[t].format(ex[i]))) for i in idx])
    p = tmp_path / "idx.json"
    p.write_text(json.dumps({"indices": TEST_IDX, "bbh_sha256": digests}))
    return str(p)


def test_bbh_formats(sdist, index_file):
    nav = data.load_bbh(sdist, "navigate", index_file=index_file)["test"][0]
    assert nav == {"input": "If you follow these instructions, do you return to the starting point? "
                            "Take 7 steps. Turn around.\nOptions:\n- Yes\n- No", "target": "No"}
    hyp = data.load_bbh(sdist, "hyperbaton", index_file=index_file)["test"][1]     # example 0: bad first
    assert hyp == {"input": "Which sentence has the correct adjective order:\nOptions:\n"
                            "(A) red old big 0 box\n(B) big old 0 red box", "target": "(B)"}
    ld = data.load_bbh(sdist, "logical_deduction_seven_objects", index_file=index_file)["test"][0]
    assert ld["input"].startswith("The following paragraphs each describe a set of seven objects arranged in "
                                  "a fixed order. The statements are logically consistent within each "
                                  "paragraph. Seven birds 4.\nOptions:\n(A) Bird A is first\n(B) Bird B")
    assert ld["target"] == "(E)"
    sp = data.load_bbh(sdist, "sports_understanding", index_file=index_file)["test"]
    assert sp == [{"input": 'Is the following sentence plausible? "Player 6 scored."', "target": "no"},
                  {"input": 'Is the following sentence plausible? "Player 0 scored."', "target": "no"}]


@pytest.mark.parametrize("task", sorted(TEST_IDX))
def test_bbh_splits_follow_dln(sdist, index_file, task):
    t = data.TASKS[task]
    s = data.load_bbh(sdist, task, index_file=index_file)
    every = [dict(zip(("input", "target"), t.format(e))) for e in data.read_task_examples(sdist, task)]
    assert s["test"] == [every[i] for i in TEST_IDX[task]]                 # BBH order
    rest = [r for i, r in enumerate(every) if i not in TEST_IDX[task]]
    n = len(rest)
    assert (len(s["train"]), len(s["dev"])) == (n // 2, n - n // 2)
    test_inputs = {r["input"] for r in s["test"]}
    assert not test_inputs & {r["input"] for r in s["train"] + s["dev"]}
    order = list(rest)
    np.random.RandomState(42).shuffle(order)
    got = s["train"] + s["dev"]
    if not t.multiple_choice:
        assert got == order
    else:       # options re-shuffled: same question, same set of options, target still the right text
        for row, src in zip(got, order):
            def opts(r):
                head, _, body = r["input"].partition("\nOptions:\n")
                texts = [re.sub(r"^\([A-Z]\) ", "", o) for o in body.split("\n")]
                return head, texts, texts[data.LETTERS.index(r["target"])]
            (h1, o1, a1), (h2, o2, a2) = opts(row), opts(src)
            assert h1 == h2 and sorted(o1) == sorted(o2) and a1 == a2
        assert any(r["input"] != o["input"] for r, o in zip(got, order))
    assert data.load_bbh(sdist, task, index_file=index_file) == s          # deterministic
    assert all(t.label(r["target"]) < len(t.classes) for r in got)


def test_bbh_checksum_mismatch_and_bad_args(sdist, index_file, tmp_path):
    meta = json.loads(open(index_file).read())
    meta["indices"]["navigate"] = [7, 9, 2]                                  # same items, other order
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256"):
        data.load_bbh(sdist, "navigate", index_file=str(bad))
    with pytest.raises(ValueError, match="task must be one of"):
        data.load_bbh(sdist, "date_understanding", index_file=index_file)
    meta["indices"]["navigate"] = [11]
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="out of range"):
        data.load_bbh(sdist, "navigate", index_file=str(bad))


def _real_sdist():
    try:
        return data.locate_sdist()
    except FileNotFoundError:
        return None


REAL = _real_sdist()


@pytest.mark.skipif(REAL is None, reason="no bigbench sdist on this machine (python/prepare_data.py fetches it)")
@pytest.mark.parametrize("task,sizes", [("navigate", (375, 375)), ("hyperbaton", (1000, 300)),
                                        ("sports_understanding", (372, 372)),
                                        ("logical_deduction_seven_objects", (225, 225))])
def test_real_sdist_matches_bbh_checksums(task, sizes):
    s = data.load_bbh(REAL, task)        # raises unless the 250 test items hash to BBH's sha256
    assert len(s["test"]) == 250 and (len(s["train"]), len(s["dev"])) == sizes
