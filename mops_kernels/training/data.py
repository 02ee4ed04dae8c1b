"""BIG-bench generative tasks as multi-task instruction data, read straight from the `bigbench` sdist.

The sdist (bigbench 1.0.0 from PyPI, pinned by sha256: `find_sdist`) holds every task as
`bigbench-*/bigbench/benchmark_tasks/<task>/task.json`; we read those members with `tarfile`, never
installing the package. An example is kept when it has an `input` string and a `target` that is a
string (or a list whose first element is a string). Splits are fixed by a seed: the examples of a task
are shuffled with random.Random(seed) and cut into train / validation / test by fractions.

Cache layout written by `prepare()`:
    CACHE/<task>/{train,validation,test}.jsonl     one {"task", "input", "target"} per line
    CACHE/manifest.json                            tasks (label order), seed, fractions, counts, sdist

Batches (`collate`): right-padded input_ids [B, T], attention_mask [B, T], labels [B, T] (-100 on the
instruction and on padding: the LM loss sees the target tokens only), input_mask [B, T] (1 on the
instruction tokens: what the gate reads), task [B] (label = index in the manifest's task list).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import subprocess
import sys
import tarfile
import warnings
from typing import Dict, Iterable, List, Optional, Sequence

import torch

SPLITS = ("train", "validation", "test")
TASK_JSON = re.compile(r"^[^/]+/bigbench/benchmark_tasks/([^/]+)/task\.json$")


def _target_text(target) -> Optional[str]:
    if isinstance(target, str):
        return target
    if isinstance(target, list) and target and isinstance(target[0], str):
        return target[0]
    return None


def read_tasks(sdist: str, names: Optional[Iterable[str]] = None) -> Dict[str, List[dict]]:
    """{task: [{"input", "target"}, ...]} for the top-level JSON tasks of the sdist (all, or `names`).

    Tasks whose task.json has no usable generative example are left out of the result."""
    wanted = None if names is None else set(names)
    out: Dict[str, List[dict]] = {}
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            m = TASK_JSON.match(member.name)
            if not m or not member.isfile() or (wanted is not None and m.group(1) not in wanted):
                continue
            try:
                task = json.load(tar.extractfile(member))
            except (ValueError, UnicodeDecodeError):
                continue
            examples = []
            for ex in task.get("examples", []) if isinstance(task, dict) else []:
                inp, tgt = ex.get("input"), _target_text(ex.get("target"))
                if isinstance(inp, str) and tgt is not None and inp.strip() and tgt.strip():
                    examples.append({"input": inp, "target": tgt})
            if examples:
                out[m.group(1)] = examples
    return out


def split_examples(examples: Sequence[dict], seed: int, fractions=(0.8, 0.1, 0.1),
                   max_examples: Optional[int] = None) -> Dict[str, List[dict]]:
    """Shuffle by seed, keep at most max_examples, cut by fractions (validation/test >= 1 each when
    there are >= 3 examples)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    ex = list(examples)
    random.Random(seed).shuffle(ex)
    if max_examples is not None:
        ex = ex[:max_examples]
    n = len(ex)
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {"train": ex[:n_train], "validation": ex[n_train:n_train + n_val], "test": ex[n_train + n_val:]}


# The one bigbench sdist the data preparation reads, pinned by version and sha256 (PyPI's). It is
# fetched by pip, by name, in --require-hashes mode: pip checks the archive's hash before it runs
# anything of it (pip download prepares an sdist's metadata, i.e. runs its build code), so only this
# exact file can ever run; we check the hash again on every use.
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# Where the programs keep it by default (private to the user; MOPS_CACHE moves it).
SDIST_CACHE = os.path.join(os.environ.get("MOPS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mops_kernels")),
                           "bigbench")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sdist(path: str) -> str:
    """`path` if it is the pinned bigbench sdist (sha256), else ValueError naming both hashes."""
    got = sha256_file(path)
    if got != BIGBENCH_SHA256:
        raise ValueError(f"{path}: sha256 {got} is not the pinned {BIGBENCH_SDIST} ({BIGBENCH_SHA256})")
    return path


def _shared_writable(d: str) -> bool:
    """A directory other users can write into (or replace files in): /tmp and the like."""
    try:
        st = os.stat(d)
    except OSError:
        return False
    return bool(st.st_mode & stat.S_IWOTH) or (hasattr(os, "getuid") and st.st_uid != os.getuid())


def find_sdist(search_dirs: Sequence[str] = (), download_dir: Optional[str] = None) -> str:
    """The pinned bigbench sdist: `BIGBENCH_SDIST` in one of search_dirs (directories other users
    can write are skipped), else downloaded into download_dir (created private), and in both cases
    checked against BIGBENCH_SHA256."""
    for d in search_dirs:
        if _shared_writable(d):
            warnings.warn(f"find_sdist: not searching {d}: other users can write there")
            continue
        path = os.path.join(d, BIGBENCH_SDIST)
        if os.path.isfile(path):
            return check_sdist(path)
    if download_dir is None:
        raise FileNotFoundError(f"no {BIGBENCH_SDIST} found in {list(search_dirs)} and no download_dir given")
    os.makedirs(download_dir, mode=0o700, exist_ok=True)
    if _shared_writable(download_dir):
        raise ValueError(f"download_dir {download_dir} is writable by other users; give a private directory")
    path = os.path.join(download_dir, BIGBENCH_SDIST)
    if os.path.isfile(path):
        return check_sdist(path)
    fetch_sdist(download_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pip download left no {BIGBENCH_SDIST} in {download_dir}")
    try:
        return check_sdist(path)
    except ValueError:
        os.remove(path)                   # never leave an unchecked file where the next run looks
        raise


def fetch_sdist(download_dir: str) -> None:
    """pip download of the pinned sdist into download_dir (--require-hashes: see BIGBENCH_SHA256)."""
    req = os.path.join(download_dir, "bigbench-requirement.txt")
    with open(req, "w") as f:
        f.write(f"bigbench=={BIGBENCH_VERSION} --hash=sha256:{BIGBENCH_SHA256}\n")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--require-hashes", "-r", req, "-d", download_dir], check=True)
    finally:
        os.remove(req)


def prepare(sdist: str, out: str, tasks: Sequence[str], seed: int = 0, fractions=(0.8, 0.1, 0.1),
            max_examples: Optional[int] = None, min_examples: int = 30) -> dict:
    """Write the cache (see the module docstring) for the tasks present in the sdist with at least
    min_examples usable examples; returns the manifest. Raises if none qualifies."""
    found = read_tasks(sdist, tasks)
    kept = [t for t in tasks if len(found.get(t, ())) >= min_examples]
    if not kept:
        raise ValueError(f"none of the tasks {list(tasks)} has >= {min_examples} generative examples in {sdist}")
    counts = {}
    for t in kept:
        parts = split_examples(found[t], seed, fractions, max_examples)
        os.makedirs(os.path.join(out, t), exist_ok=True)
        for split, rows in parts.items():
            with open(os.path.join(out, t, f"{split}.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps({"task": t, **r}) + "\n")
        counts[t] = {s: len(r) for s, r in parts.items()}
    manifest = dict(tasks=kept, skipped=[t for t in tasks if t not in kept], seed=seed,
                    fractions=list(fractions), max_examples=max_examples, counts=counts,
                    sdist=os.path.basename(sdist))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load_split(cache: str, split: str, tasks: Optional[Sequence[str]] = None) -> List[dict]:
    """Rows of one split with "label" = the task's index in the manifest (all tasks, or `tasks`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with open(os.path.join(cache, "manifest.json")) as f:
        order = json.load(f)["tasks"]
    rows = []
    for t in (order if tasks is None else tasks):
        if t not in order:
            raise ValueError(f"task {t!r} is not in {cache}/manifest.json (has {order})")
        with open(os.path.join(cache, t, f"{split}.jsonl")) as f:
            rows += [dict(json.loads(line), label=order.index(t)) for line in f if line.strip()]
    return rows


def task_names(cache: str) -> List[str]:
    with open(os.path.join(cache, "manifest.json")) as f:
        return json.load(f)["tasks"]


class ByteTokenizer:
    """The tokenizer of a backbone that has none (load_backbone(config=...): random weights, tests):
    UTF-8 bytes b -> 1 + b % (vocab_size - 1) (0 is the padding id); no special tokens."""

    eos_token_id = None
    pad_token_id = 0

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + b % (self.vocab_size - 1) for b in text.encode("utf-8")]}


def encode(tok, row: dict, max_len: int, add_eos: bool = False, separator: str = "",
           truncate: bool = True) -> Optional[dict]:
    """Token ids of "input" + separator, then " target" (+ EOS if add_eos: off by default, since an
    instruct model's EOS, e.g. SmolLM2's <|im_end|>, is near-impossible after raw text and would
    dominate the target loss). Too long for max_len: with truncate the target is cut first (the
    instruction keeps >= half of max_len, cut from the left); without, None (the caller drops it)."""
    # rstrip: some tasks end the instruction with a space ("... the English word "), which with the
    # " target" join would give a double space, a token sequence the model never saw before a word.
    inp = tok(row["input"].rstrip() + separator, add_special_tokens=False)["input_ids"]
    tgt = tok(" " + row["target"].strip(), add_special_tokens=False)["input_ids"]
    if add_eos and tok.eos_token_id is not None:
        tgt = tgt + [tok.eos_token_id]
    if not truncate and len(inp) + len(tgt) > max_len:
        return None
    keep_in = min(len(inp), max(max_len // 2, max_len - len(tgt)))
    inp = inp[-keep_in:] if keep_in else []
    tgt = tgt[:max_len - len(inp)]
    return dict(ids=inp + tgt, n_input=len(inp), label=int(row.get("label", 0)))


def collate(items: Sequence[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded batch of encode() outputs (see the module docstring for the fields)."""
    T = max(len(it["ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    inp = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, it in enumerate(items):
        n, k = len(it["ids"]), it["n_input"]
        ids[i, :n] = torch.tensor(it["ids"])
        attn[i, :n] = 1
        inp[i, :k] = 1
        labels[i, k:n] = ids[i, k:n]
    return dict(input_ids=ids, attention_mask=attn, labels=labels, input_mask=inp,
                task=torch.tensor([it["label"] for it in items], dtype=torch.long))
