"""BIG-Bench Hard tasks for DLN, rebuilt offline from the `bigbench` sdist (no download of BBH).

    splits = load_bbh(sdist, "navigate")        # {"train": [...], "dev": [...], "test": [...]}
    splits["test"][0]                            # {"input": "If you follow ...\\nOptions:\\n- Yes\\n- No",
                                                 #  "target": "No"}

Tasks (TASKS): navigate, hyperbaton, sports_understanding, logical_deduction_seven_objects. Each
BIG-bench example (`target_scores`) is written as BBH writes it (suzgunmirac/BIG-Bench-Hard, bbh/*.json):
- navigate:    "If you follow these instructions, do you return to the starting point? {input}"
               + "\\nOptions:\\n- Yes\\n- No", target "Yes" / "No";
- hyperbaton:  "Which sentence has the correct adjective order:\\nOptions:\\n(A) ...\\n(B) ...", the
               two quoted candidates in BIG-bench order, target "(A)" / "(B)";
- logical_deduction_seven_objects: BIG-bench's task prefix (one line) + " {input}", then
               "\\nOptions:\\n(A) ..." with each choice's final period dropped, target "(A)".."(G)";
- sports_understanding: 'Is the following sentence plausible? "{input}."', target "yes" / "no".
These are the formats of microsoft/deep-language-networks scripts/split_bigbench_<task>.py (sports is
not there; its format is BBH's).

Splits, as DLN's code makes them (dln/dataset.py, class BBH):
- test: BBH's 250 items, in BBH's order: the sdist examples at the indices listed in
  mops_kernels/data/bbh_test_indices.json (built from BBH@9ee07bd, with the sha256 of
  json.dumps([[input, target], ...]) that `load_bbh` checks);
- train / dev: the other examples ("BIG-bench minus BBH": an example whose formatted input equals a
  test input is dropped, as DLN's split scripts do), shuffled by numpy RandomState(42); the first
  min(n // 2, 1000) are train, the next min(n - n // 2, 1000) dev; the options of every multiple-choice
  example are re-shuffled by the same generator as it is read (DLN's `option_shuffle`: navigate and
  sports are yes/no and keep theirs); hyperbaton's dev set is cut to its first 300.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import tarfile
from typing import Callable, Dict, List, Optional

import numpy as np

LETTERS = ["(A)", "(B)", "(C)", "(D)", "(E)", "(F)", "(G)"]
INDEX_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                          "bbh_test_indices.json")


def _choice(ex: dict) -> int:
    keys = list(ex["target_scores"])
    hits = [j for j, k in enumerate(keys) if ex["target_scores"][k] == 1]
    if len(hits) != 1:
        raise ValueError(f"example must have exactly one target_scores entry equal to 1, got {ex['target_scores']}")
    return hits[0]


def _navigate(ex: dict):
    names = {"True": "Yes", "False": "No"}
    lines = ["If you follow these instructions, do you return to the starting point? " + ex["input"], "Options:"]
    lines += ["- " + names[k] for k in ex["target_scores"]]
    return "\n".join(lines), names[list(ex["target_scores"])[_choice(ex)]]


def _hyperbaton(ex: dict):
    quoted = ex["input"].split("Which sentence has the correct adjective order:")[-1].strip().split('"')
    cands = [quoted[1].strip(), quoted[3].strip()]
    lines = ["Which sentence has the correct adjective order:", "Options:"]
    lines += [f"{LETTERS[j]} {c}" for j, c in enumerate(cands)]
    return "\n".join(lines), LETTERS[_choice(ex)]


_LD7_PREFIX = ("The following paragraphs each describe a set of seven objects arranged in a fixed order. "
               "The statements are logically consistent within each paragraph. ")


def _logical_deduction_seven(ex: dict):
    lines = [_LD7_PREFIX + ex["input"], "Options:"]
    lines += [f"{LETTERS[j]} {k[:-1]}" for j, k in enumerate(ex["target_scores"])]   # BBH drops the period
    return "\n".join(lines), LETTERS[_choice(ex)]


def _sports(ex: dict):
    return f'Is the following sentence plausible? "{ex["input"]}."', \
        "yes" if ex["target_scores"]["plausible"] == 1 else "no"


class Task:
    """One BBH task: where it sits in the sdist, how an example is written, its classes for scoring.

    classes: DLN's verbaliser classes ("yes|Yes": either string, with or without a leading space,
    counts for the class); `label(target)` is the index of a target's class."""

    def __init__(self, path: str, fmt: Callable, classes: List[str], targets: List[str], multiple_choice: bool,
                 instruction: str, dev_cap: Optional[int] = None):
        self.path, self.format, self.classes, self.targets = path, fmt, classes, targets
        self.multiple_choice, self.instruction, self.dev_cap = multiple_choice, instruction, dev_cap

    def label(self, target: str) -> int:
        if target not in self.targets:
            raise ValueError(f"target {target!r} is not one of {self.targets}")
        return self.targets.index(target)


# instruction: DLN's dataset_info.yaml "instruction" (its 0-shot prompt); sports_understanding is not
# in DLN, its instruction is written here in the same style.
TASKS: Dict[str, Task] = {
    "navigate": Task("navigate", _navigate, ["yes|Yes", "no|No"], ["Yes", "No"], False,
                     "Read the following sentence, then determine whether you return to the starting point."),
    "hyperbaton": Task("hyperbaton", _hyperbaton, ["a|A", "b|B"], LETTERS[:2], True,
                       "Which sentence has the correct adjective order:", dev_cap=300),
    "sports_understanding": Task("sports_understanding", _sports, ["yes|Yes", "no|No"], ["yes", "no"], False,
                                 "Read the following sentence, then determine whether it is plausible."),
    "logical_deduction_seven_objects": Task(
        "logical_deduction/seven_objects", _logical_deduction_seven,
        ["a|A", "b|B", "c|C", "d|D", "e|E", "f|F", "g|G"], LETTERS, True,
        "A seven-object logical deduction task which requires deducing the order of a sequence of objects."),
}

_OPTION = re.compile(r"\([A-Z]\)\s(.*)")


def option_shuffle(row: dict, rng: np.random.RandomState) -> dict:
    """DLN's option_shuffle: permute the "(X) text" options of a row by rng, relabel the target."""
    head, sep, options = row["input"].partition("\nOptions:\n")
    if not sep:
        raise ValueError(f"row has no '\\nOptions:\\n' block: {row['input'][:80]!r}")
    texts = [_OPTION.findall(o)[-1] for o in options.strip().split("\n")]
    perm = list(rng.permutation(range(len(texts))))
    target = LETTERS[perm.index(LETTERS.index(row["target"]))]
    body = "\n".join(f"{LETTERS[i]} {texts[p]}" for i, p in enumerate(perm))
    return {"input": f"{head}\nOptions:\n{body}", "target": target}


@functools.lru_cache(maxsize=4)
def _task_files(sdist: str, mtime: float) -> Dict[str, list]:
    """{task: examples} for every task of TASKS found in the sdist, in one pass over the archive (a
    gzip tar cannot seek: each pass decompresses it; cached per file and modification time)."""
    want = {f"/bigbench/benchmark_tasks/{t.path}/task.json": name for name, t in TASKS.items()}
    out = {}
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            tail = member.name[member.name.find("/"):]
            if tail in want:
                out[want[tail]] = json.load(tar.extractfile(member))["examples"]
                if len(out) == len(want):
                    break
    return out


def read_task_examples(sdist: str, task: str) -> List[dict]:
    """The raw `examples` of one task's task.json in the sdist (nested paths such as
    logical_deduction/seven_objects included). Returns a copy."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    found = _task_files(os.path.abspath(sdist), os.path.getmtime(sdist))
    if task not in found:
        raise FileNotFoundError(f"{sdist} has no member */bigbench/benchmark_tasks/{TASKS[task].path}/task.json")
    return copy.deepcopy(found[task])


def test_indices(task: str, index_file: str = INDEX_FILE):
    """(indices of BBH's test items among the sdist task's examples, sha256 of the test set)."""
    with open(index_file) as f:
        meta = json.load(f)
    if task not in meta["indices"]:
        raise ValueError(f"{index_file} lists no test indices for task {task!r}")
    return meta["indices"][task], meta["bbh_sha256"][task]


def test_digest(rows: List[dict]) -> str:
    return hashlib.sha256(json.dumps([[r["input"], r["target"]] for r in rows]).encode()).hexdigest()


def load_bbh(sdist: str, task: str, *, index_file: str = INDEX_FILE, check: bool = True) -> Dict[str, List[dict]]:
    """{"train", "dev", "test"}: lists of {"input", "target"} for `task` (see the module docstring).

    check: the test set must hash to the recorded sha256 (a ValueError says it does not)."""
    t = TASKS.get(task)
    if t is None:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    examples = [dict(zip(("input", "target"), t.format(ex))) for ex in read_task_examples(sdist, task)]
    idx, digest = test_indices(task, index_file)
    bad = [i for i in idx if not 0 <= i < len(examples)]
    if bad:
        raise ValueError(f"test indices {bad[:5]} out of range for {len(examples)} examples of {task}")
    test = [examples[i] for i in idx]
    if check and test_digest(test) != digest:
        raise ValueError(f"{task}: the rebuilt BBH test set does not match the sha256 in {index_file} "
                         f"(another sdist version or a formatting change)")
    held = {r["input"] for r in test}
    rest = [r for r in examples if r["input"] not in held]
    n_train, n_dev = min(len(rest) // 2, 1000), min(len(rest) - len(rest) // 2, 1000)
    if n_train < 1 or n_dev < 1:
        raise ValueError(f"{task}: {len(rest)} examples outside the test set, too few for train and dev")
    rng = np.random.RandomState(42)
    rng.shuffle(rest)
    out = {"train": [], "dev": []}
    for i, row in enumerate(rest[:n_train + n_dev]):
        if t.multiple_choice:
            row = option_shuffle(row, rng)
        out["train" if i < n_train else "dev"].append(row)
    if t.dev_cap is not None:
        out["dev"] = out["dev"][:t.dev_cap]
    out["test"] = test
    return out


def locate_sdist(download_dir: Optional[str] = None) -> str:
    """The pinned bigbench sdist (sha256-checked): $MOPS_BIGBENCH_SDIST, else training.data.find_sdist
    over the default cache (training.data.SDIST_CACHE), downloaded into download_dir when given."""
    from ..training.data import SDIST_CACHE, check_sdist, find_sdist
    env = os.environ.get("MOPS_BIGBENCH_SDIST")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"MOPS_BIGBENCH_SDIST={env} is not a file")
        return check_sdist(env)
    return find_sdist([SDIST_CACHE], download_dir=download_dir)
