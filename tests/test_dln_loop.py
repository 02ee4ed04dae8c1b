"""DLN-1 loop semantics with a fake scorer and a fake proposer (no model)."""
import json
import math

import numpy as np
import pytest
import torch

from mops_kernels.dln import templates as T
from mops_kernels.dln.loop import DLN1, balanced_batch

CLASSES = ["yes|Yes", "no|No"]


class FakeScorer:
    """Prompt p puts probability skill[p] on the right class of a training input; on dev input i it is
    right exactly when (i % 10) / 10 < dev_skill[p] (dev accuracy ~ dev_skill). Labels are in the input
    text ("train 3 y" / "dev 7 n"). Records every call."""

    def __init__(self, skill, dev_skill=None):
        self.skill, self.dev_skill, self.calls = skill, dev_skill or skill, []

    def class_logprobs(self, prompts, inputs, classes):
        self.calls.append(list(prompts))
        out = torch.empty(len(prompts), len(inputs), len(classes))
        for i, p in enumerate(prompts):
            for j, x in enumerate(inputs):
                s = self.skill.get(p, 0.5)
                if x.startswith("dev"):
                    s = 0.9 if int(x.split()[1]) % 10 / 10 < self.dev_skill.get(p, 0.5) else 0.1
                right = 0 if x.endswith("y") else 1
                out[i, j] = math.log((1 - s) / (len(classes) - 1))
                out[i, j, right] = math.log(s)
        return out


class FakeProposer:
    name = "fake"

    def __init__(self, script):
        self.script, self.texts, self.calls = script, [], 0

    def generate(self, texts, seed, max_new_tokens=96, stop=T.STOP):
        self.texts += texts
        out = [self.script[(self.calls + i) % len(self.script)] for i in range(len(texts))]
        self.calls += 1
        return out


def rows(split, n):
    return [{"input": f"{split} {i} {'y' if i % 3 else 'n'}", "label": 0 if i % 3 else 1} for i in range(n)]


TRAIN, DEV = rows("train", 31), rows("dev", 13)


def test_current_prompt_always_scored_and_argmax_wins():
    scorer = FakeScorer({"init": 0.4, "good": 0.9, "bad": 0.2})
    dln = DLN1(scorer, FakeProposer(["bad", "good", "bad"]), CLASSES, num_candidates=4, batch_size=6, iters=3,
               memory=0)
    out = dln.fit(TRAIN, DEV, "init")
    steps = [e for e in dln.state["log"] if "candidates" in e]
    assert len(steps) == 3
    for e in steps:
        assert e["candidates"][0] == e["current"]                 # the current prompt is a candidate
        assert e["candidates"] in scorer.calls                    # scored together, current first
    assert steps[0]["chosen"] == "good" and steps[0]["author"] == "fake"
    assert out == {"prompt": "good", "author": "fake", "dev_acc": dln.accuracy("good", DEV)}


def test_tie_keeps_current_prompt():
    scorer = FakeScorer({"init": 0.7, "same": 0.7, "worse": 0.6})
    dln = DLN1(scorer, FakeProposer(["same", "worse"]), CLASSES, num_candidates=3, batch_size=6, iters=2,
               memory=0)
    out = dln.fit(TRAIN, DEV, "init")
    assert all(e["chosen"] == "init" for e in dln.state["log"] if "chosen" in e)
    assert out["prompt"] == "init" and out["author"] == "init"


def test_memory_keeps_best_dev_prompts_and_offers_them():
    skill = {"init": 0.55, "p1": 0.6, "p2": 0.7, "p3": 0.8, "p4": 0.9}
    scorer = FakeScorer(skill)
    dln = DLN1(scorer, FakeProposer(["p1", "p2", "p3", "p4"]), CLASSES, num_candidates=2, batch_size=6, iters=6,
               val_freq=1, memory=2)
    dln.fit(TRAIN, DEV, "init")
    mem = dln.state["memory"]
    assert len(mem) == 2 and [m[0] for m in mem] == ["p4", "p3"]
    assert mem[0][1] >= mem[1][1]
    late = [e for e in dln.state["log"] if "candidates" in e][-1]
    assert {"p3", "p4"} <= set(late["candidates"])                # memory prompts are candidates


def test_patience_reloads_best_dev_prompt_and_test_gets_best_dev():
    # "overfit" wins every training batch but is bad on dev: after `tolerance` evaluations without a
    # better dev accuracy the loop goes back to the best dev prompt, and that is the one returned.
    scorer = FakeScorer({"init": 0.6, "overfit": 0.95}, dev_skill={"init": 0.6, "overfit": 0.1})
    dln = DLN1(scorer, FakeProposer(["overfit"]), CLASSES, num_candidates=2, batch_size=6, iters=4, val_freq=1,
               memory=1, tolerance=1)
    out = dln.fit(TRAIN, DEV, "init")
    reloads = [e for e in dln.state["log"] if "reloaded" in e]
    assert reloads and all(e["reloaded"] == "init" for e in reloads)
    assert out["prompt"] == "init" and out["dev_acc"] == dln.accuracy("init", DEV)
    assert dln.accuracy("overfit", DEV) < out["dev_acc"]


def test_same_seed_same_prompts_and_logs_and_resume():
    def run(seed, stop_after=None):
        scorer = FakeScorer({"init": 0.5, "a": 0.6, "b": 0.65, "c": 0.7})
        prop = FakeProposer(["a", "b", "c"])
        dln = DLN1(scorer, prop, CLASSES, num_candidates=3, batch_size=8, iters=5, seed=seed, memory=2)
        dln.init_state("init")
        if stop_after is None:
            dln.fit(TRAIN, DEV)
            return dln.state, prop.texts
        for _ in range(stop_after):
            dln.step(TRAIN, DEV)
        saved = json.loads(json.dumps(dln.state_dict()))          # what python/dln.py writes
        again = DLN1(scorer, prop, CLASSES, num_candidates=3, batch_size=8, iters=5, seed=seed, memory=2)
        again.load_state_dict(saved)
        again.fit(TRAIN, DEV)
        return again.state, prop.texts

    s1, texts1 = run(7)
    s2, texts2 = run(7)
    assert s1 == s2 and texts1 == texts2
    s3, texts3 = run(7, stop_after=2)
    assert s3["log"] == s1["log"] and texts3 == texts1
    s4, texts4 = run(8)
    assert texts4 != texts1                                        # the seed draws other batches


def test_balanced_batch_and_backward_template():
    labels = [0] * 20 + [1] * 5
    idx = balanced_batch(labels, 10, np.random.RandomState(0))
    assert len(set(idx)) == 10 and sum(labels[i] for i in idx) == 5
    text = T.backward("Be nice.", [T.Info("x1", "Yes", "Yes", 0.0), T.Info("x2", "Yes", "No", 1.0)],
                      T.MESSAGES[0])
    assert "## Instruction\n> Be nice.\n[END]" in text and text.endswith("Be concise.\n## Instruction\n>")
    assert text.index("> x1") < text.index("# Student errors") < text.index("> x2")
    assert T.cut_at_stop(" Answer carefully.\n\n## more") == "Answer carefully."
    with pytest.raises(ValueError, match="batch_size"):
        balanced_batch(labels, 26, np.random.RandomState(0))


class FakeScorer2(FakeScorer):
    """DLN-2: the output prompt's skill as in FakeScorer (the thoughts appended to the input are ignored);
    log p(h | x, p1) = -len(h) / 10 - penalty[p1] (shorter thoughts, better hidden prompts)."""

    def __init__(self, skill, penalty):
        super().__init__(skill)
        self.penalty, self.target_calls = penalty, []

    def class_logprobs(self, prompts, inputs, classes):
        return super().class_logprobs(prompts, [x.split("\nYour thoughts were:")[0] for x in inputs], classes)

    def target_logprobs(self, contexts, targets, prompts=None):
        self.target_calls.append(list(contexts))
        return torch.tensor([-len(t) / 10 - self.penalty.get(c.replace(" Let's think step by step.", ""), 1.0)
                             for c, t in zip(contexts, targets)])


class FakeProposer2(FakeProposer):
    """Posterior rewrites of the thoughts: "ok"; prompt proposals from the script."""

    def generate(self, texts, seed, max_new_tokens=96, stop=T.STOP):
        if texts[0].startswith("This is useful context"):
            return ["ok"] * len(texts)
        return super().generate(texts, seed, max_new_tokens, stop)


class FakeForward:
    name = "forward"

    def generate(self, texts, seed, max_new_tokens=96, stop=T.STOP):
        return ["thought " + t.split()[1] for t in texts]


def test_dln2_scores_both_layers_and_names_authors():
    from mops_kernels.dln.loop import DLN2

    def run():
        scorer = FakeScorer2({"": 0.4, "answer well": 0.8}, {"": 1.0, "think": 0.0})
        prop = FakeProposer2(["think", "answer well"])
        dln = DLN2(scorer, prop, FakeForward(), CLASSES, num_candidates=3, batch_size=6, iters=2, val_freq=1,
                   memory=1, num_h_samples=2, seed=3)
        out = dln.fit(TRAIN, DEV, "")
        return dln, scorer, out

    dln, scorer, out = run()
    steps = [e for e in dln.state["log"] if "chosen" in e]
    assert steps[0]["candidates_p1"][0] == "" and steps[0]["candidates_p2"][0] == ""
    assert all("Let's think step by step." in c for c in scorer.target_calls[0])
    assert dln.split(steps[0]["chosen"]) == ("think", "answer well")
    assert steps[0]["author"] == "fake"
    assert dln.split(out["prompt"]) == ("think", "answer well") and out["author"] == "fake"
    again, _, out2 = run()
    assert again.state["log"] == dln.state["log"] and out2 == out


@pytest.mark.slow
def test_engine_proposer_seeded_and_cut_at_stop_strings():
    from mops_kernels import load_backbone
    from mops_kernels.dln.proposers import EngineProposer
    model, tok = load_backbone()
    prop = EngineProposer(model, tok)
    texts = [T.backward("Answer the question.", [T.Info("Is the sky blue?", "No", "Yes", 1.0)], m)
             for m in T.MESSAGES[:2]]
    a = prop.generate(texts, seed=3, max_new_tokens=24)
    assert a == prop.generate(texts, seed=3, max_new_tokens=24)            # same seed, same proposals
    assert len(a) == 2 and all(isinstance(x, str) for x in a)
    assert not any(s in x for x in a for s in T.STOP)
    assert prop._native_stop                                               # the Engine's submit(stop=...)
    prop._native_stop = False                                              # the on_token fallback
    assert prop.generate(texts, seed=3, max_new_tokens=24) == a


@pytest.mark.slow
def test_hf_proposer_from_a_local_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mops_kernels.dln.proposers import HFProposer
    from mops_kernels.integrations.backbone import _gguf_tokenizer, default_gguf_path
    from mops_kernels.integrations.gguf_import import read_gguf
    path = default_gguf_path()
    tok = _gguf_tokenizer(path, read_gguf(path))          # SmolLM2's tokenizer, saved beside a tiny model
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prop = HFProposer(str(tmp_path))
    texts = [T.backward("Answer.", [T.Info("x", "No", "Yes", 1.0)], T.MESSAGES[0])]
    a = prop.generate(texts, seed=1, max_new_tokens=12)
    assert a == prop.generate(texts, seed=1, max_new_tokens=12) and prop.name == f"hf:{tmp_path.name}"
    assert not any(s in a[0] for s in T.STOP)
