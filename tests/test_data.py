"""BIG-bench data preparation on a tiny synthetic sdist built here (no network)."""
import io
import json
import os
import tarfile

import pytest
import torch

from mops_kernels.training import data


def _add(tar, name, obj):
    raw = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def sdist(tmp_path):
    path = tmp_path / "bigbench-0.0.tar.gz"
    root = "bigbench-0.0/bigbench/benchmark_tasks"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, f"{root}/alpha/task.json",
             {"examples": [{"input": f"a{i}?", "target": f"A{i}"} for i in range(41)]})
        _add(tar, f"{root}/beta/task.json",      # list targets (first string kept), one unusable example
             {"examples": [{"input": f"b{i}", "target": [f"B{i}", "x"]} for i in range(37)]
              + [{"input": "mc", "target_scores": {"y": 1}}]})
        _add(tar, f"{root}/gamma/task.json", {"examples": [{"input": "g", "target": "G"}] * 5})
        _add(tar, f"{root}/mc_only/task.json", {"examples": [{"input": "q", "target_scores": {"a": 1}}]})
        _add(tar, f"{root}/broken/task.json", "{not json")
        _add(tar, f"{root}/alpha/sub/task.json", {"examples": [{"input": "s", "target": "S"}]})
    return str(path)


def test_read_tasks_keeps_generative_top_level_tasks(sdist):
    tasks = data.read_tasks(sdist)
    assert sorted(tasks) == ["alpha", "beta", "gamma"]
    assert len(tasks["alpha"]) == 41 and len(tasks["beta"]) == 37
    assert tasks["beta"][3] == {"input": "b3", "target": "B3"}
    assert sorted(data.read_tasks(sdist, ["beta"])) == ["beta"]


def test_prepare_splits_are_fixed_by_seed_and_disjoint(sdist, tmp_path):
    out1, out2, out3 = (str(tmp_path / n) for n in ("c1", "c2", "c3"))
    m = data.prepare(sdist, out1, ["alpha", "beta", "gamma", "nope"], seed=3, min_examples=30)
    assert m["tasks"] == ["alpha", "beta"] and m["skipped"] == ["gamma", "nope"]
    assert m["counts"]["alpha"] == {"train": 33, "validation": 4, "test": 4}
    data.prepare(sdist, out2, ["alpha", "beta"], seed=3)
    data.prepare(sdist, out3, ["alpha", "beta"], seed=4)
    for split in data.SPLITS:
        assert data.load_split(out1, split) == data.load_split(out2, split)
    assert data.load_split(out1, "train") != data.load_split(out3, "train")
    rows = {s: data.load_split(out1, s, ["alpha"]) for s in data.SPLITS}
    inputs = [set(r["input"] for r in rows[s]) for s in data.SPLITS]
    assert not (inputs[0] & inputs[1]) and not (inputs[0] & inputs[2]) and not (inputs[1] & inputs[2])
    assert len(set.union(*inputs)) == 41
    assert {r["label"] for r in data.load_split(out1, "validation", ["beta"])} == {1}
    with pytest.raises(ValueError, match="not in"):
        data.load_split(out1, "train", ["gamma"])


def test_prepare_data_script(sdist, tmp_path, monkeypatch):
    import importlib.util
    monkeypatch.setattr(data, "BIGBENCH_SHA256", data.sha256_file(sdist))   # --sdist is checked by hash
    spec = importlib.util.spec_from_file_location(
        "prepare_data", os.path.join(os.path.dirname(__file__), "..", "python", "prepare_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.main(["--sdist", sdist, "--out", str(tmp_path / "c"), "--tasks", "alpha", "beta",
                  "--max-examples", "20", "--min-examples", "10"])
    assert m["counts"]["beta"] == {"train": 16, "validation": 2, "test": 2}
    assert os.path.isfile(tmp_path / "c" / "beta" / "test.jsonl")


class _CharTok:
    """A character tokenizer: enough to check the masks of encode/collate."""
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 50) for c in text]}


def test_encode_collate_masks_the_instruction():
    tok = _CharTok()
    items = [data.encode(tok, {"input": "abcd", "target": "xy", "label": 2}, 64, add_eos=True),
             data.encode(tok, {"input": "q", "target": "long target", "label": 0}, 8)]
    assert len(data.encode(tok, {"input": "abcd", "target": "xy"}, 64)["ids"]) == 4 + 3
    assert data.encode(tok, {"input": "abcd  ", "target": " xy"}, 64)["ids"] == \
        data.encode(tok, {"input": "abcd", "target": "xy"}, 64)["ids"]
    assert items[0]["n_input"] == 4 and len(items[0]["ids"]) == 4 + 3 + 1
    assert len(items[1]["ids"]) == 8 and items[1]["n_input"] == 1
    b = data.collate(items, pad_id=0)
    assert b["input_ids"].shape == (2, 8)
    assert b["labels"][0].tolist() == [-100] * 4 + b["input_ids"][0, 4:8].tolist()
    assert b["input_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert b["attention_mask"].sum().item() == 16
    assert b["task"].tolist() == [2, 0]
    assert torch.equal(b["labels"][1, 1:], b["input_ids"][1, 1:])


def test_byte_tokenizer_for_backbones_without_one():
    from mops_kernels.training.data import ByteTokenizer, collate, encode
    tok = ByteTokenizer(97)
    ids = tok("héllo")["input_ids"]
    assert len(ids) == len("héllo".encode("utf-8")) and all(1 <= i < 97 for i in ids)
    assert tok("a")["input_ids"] != tok("b")["input_ids"]
    it = encode(tok, {"input": "2+2 =", "target": "4", "label": 3}, max_len=16)
    assert it["ids"] == tok("2+2 =")["input_ids"] + tok(" 4")["input_ids"] and it["n_input"] == 5
    b = collate([it], tok.pad_token_id)
    assert b["labels"][0].tolist() == [-100] * 5 + tok(" 4")["input_ids"] and int(b["task"][0]) == 3
    with pytest.raises(ValueError):
        ByteTokenizer(1)
