"""python/dln.py end to end on a tiny random backbone: train, --eval-only reproduces the stored test
accuracy exactly, --resume after an interruption ends where the uninterrupted run ends."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from mops_kernels.dln import data  # noqa: E402
from mops_kernels.dln.loop import DLN1  # noqa: E402

try:
    SDIST = data.locate_sdist()
except FileNotFoundError:
    SDIST = None

CFG = json.dumps(dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048))
pytestmark = pytest.mark.skipif(SDIST is None, reason="no bigbench sdist on this machine")


def _args(out, *extra):
    return ["--task", "navigate", "--sdist", SDIST, "--backbone-config", CFG, "--proposer", "template",
            "--iters", "3", "--batch-size", "4", "--candidates", "3", "--val-freq", "1", "--dev-size", "7",
            "--test-size", "9", "--seed", "5", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny():
    import dln
    return dict(zip(("model", "tok"), dln.load_model(dln.parser().parse_args(_args("unused")))))


def test_train_eval_only_and_resume(tmp_path, monkeypatch, tiny):
    import dln
    full = dln.main(_args(tmp_path / "a"), **tiny)
    stored = json.loads((tmp_path / "a" / "result.json").read_text())
    assert stored["test_acc"] == full["test_acc"] and stored["n_test"] == 9
    assert stored["author"] in ("init", "template")
    assert stored["tokens"]["prefill_tokens"] < stored["tokens"]["plain_tokens"]
    again = dln.main(_args(tmp_path / "e", "--eval-only", "--prompt", stored["prompt"]), **tiny)
    assert again["test_acc"] == stored["test_acc"] and again["test_pred"] == stored["test_pred"]

    calls = {"n": 0}
    real_step = DLN1.step

    def interrupted(self, train, dev):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, train, dev)

    monkeypatch.setattr(DLN1, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dln.main(_args(tmp_path / "b"), **tiny)
    monkeypatch.setattr(DLN1, "step", real_step)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["t"] == 2
    resumed = dln.main(_args(tmp_path / "b", "--resume"), **tiny)
    for k in ("prompt", "author", "dev_acc", "test_acc", "test_pred"):
        assert resumed[k] == full[k]
    assert json.loads((tmp_path / "b" / "state.json").read_text())["log"] == \
        json.loads((tmp_path / "a" / "state.json").read_text())["log"]


def test_dln2_runs_end_to_end(tmp_path, tiny):
    import dln
    res = dln.main(_args(tmp_path / "c", "--layers", "2", "--iters", "1"), **tiny)
    assert res["layers"] == 2 and "\x1e" in res["prompt"] and 0.0 <= res["test_acc"] <= 1.0
    again = dln.main(_args(tmp_path / "d", "--layers", "2", "--eval-only", "--prompt", res["prompt"]), **tiny)
    assert again["test_acc"] == res["test_acc"]
