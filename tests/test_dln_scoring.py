"""PromptScorer (SPEC §7): shared-prefix scoring equals the plain concatenated forward and transformers."""
import copy

import pytest
import torch

from _hf_doubles import tiny_model
from mops_kernels.dln.scoring import PromptScorer, forward_context
from mops_kernels.training.data import ByteTokenizer

PROMPTS = ["", "Answer with the letter of the best option.", "Be brief.\nThink.",
           "A much longer instruction that says many things about the options and the way to pick one."]
INPUTS = ["Q1: pick one\nOptions:\n(A) x\n(B) y", "short", "Which? (a) or (b) or (c), given a long story " * 3,
          "x" * 37, "Is it so?"]
CLASSES = ["a|A", "b|B", "c|C"]


def _transformers_class_logprobs(model, tok, prompts, inputs, classes):
    """The oracle: each pair's whole text through transformers' own (eager) attention."""
    verb = [sorted({tok(w)["input_ids"][0] for v in c.split("|") for w in (v, " " + v)
                    if len(tok(w)["input_ids"]) == 1}) for c in classes]
    out = torch.empty(len(prompts), len(inputs), len(classes))
    for i, p in enumerate(prompts):
        for j, x in enumerate(inputs):
            ids = torch.tensor([tok(forward_context(p, x) + "\n")["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
            s = torch.stack([logp[v].logsumexp(-1) for v in verb])
            out[i, j] = torch.log_softmax(s, -1)
    return out


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", layers=3, seed=3, attn_implementation="eager")
    return model, ByteTokenizer(model.config.vocab_size)


@pytest.mark.parametrize("budgets", [(4096, 16384), (97, 53)])      # one batch / many batches and pools
def test_class_logprobs_equal_plain_and_transformers(tiny, budgets):
    model, tok = tiny
    with torch.no_grad():
        want = _transformers_class_logprobs(model, tok, PROMPTS, INPUTS, CLASSES)
    ours = copy.deepcopy(model)
    shared = PromptScorer(ours, tok, token_budget=budgets[0], prefix_budget=budgets[1])
    got = shared.class_logprobs(PROMPTS, INPUTS, CLASSES)
    assert shared.stats.shared_pairs == (len(PROMPTS) - 1) * len(INPUTS)   # every non-empty prompt shared
    assert shared.stats.prefill_tokens < shared.stats.plain_tokens
    plain = PromptScorer(ours, tok, share=False, token_budget=budgets[0]).class_logprobs(PROMPTS, INPUTS, CLASSES)
    assert got.shape == (len(PROMPTS), len(INPUTS), len(CLASSES))
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(len(PROMPTS), len(INPUTS)))
    assert (got.std(dim=1) > 1e-3).any()              # the inputs change the answer: not a constant


class MergingTokenizer(ByteTokenizer):
    """Bytes, except "\\n\\nQ" is one token: a prompt's "\\n\\n" then does not start the input's tokens."""

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("\n\nQ", i):
                ids.append(self.vocab_size - 1)
                i += 3
            else:
                ids += super().__call__(text[i])["input_ids"]
                i += 1
        return {"input_ids": ids}


def test_tokenisation_mismatch_falls_back_to_plain(tiny):
    model, _ = tiny
    tok = MergingTokenizer(model.config.vocab_size)
    with torch.no_grad():
        want = _transformers_class_logprobs(model, tok, PROMPTS[1:], INPUTS, CLASSES)
    scorer = PromptScorer(copy.deepcopy(model), tok)
    got = scorer.class_logprobs(PROMPTS[1:], INPUTS, CLASSES)
    assert scorer.stats.shared_pairs == (len(PROMPTS) - 1) * (len(INPUTS) - 1)   # "Q1..." pairs run in full
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_target_logprobs_equal_transformers(tiny):
    model, tok = tiny
    prompts = ["Think step by step.", "", "Think step by step.", "Other"]
    contexts = ["A: 3 + 4?", "B: long context " * 4, "C", "D: why"]
    targets = ["Seven, because 3 + 4 = 7.", "b", "the answer is (C)", "because"]
    want = []
    with torch.no_grad():
        for p, c, t in zip(prompts, contexts, targets):
            pre = p + "\n\n" if p else ""
            n = len(tok(pre + c)["input_ids"])
            ids = torch.tensor([tok(pre + c + "\n" + t)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            want.append(logp[n - 1:-1].gather(1, ids[0, n:, None]).mean())
    scorer = PromptScorer(copy.deepcopy(model), tok, token_budget=64)
    got = scorer.target_logprobs(contexts, targets, prompts=prompts)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=1e-4)
    assert scorer.stats.shared_pairs == 2          # the two "Think step by step." rows; a lone prompt runs in full
    plain = scorer.target_logprobs([(p + "\n\n" if p else "") + c for p, c in zip(prompts, contexts)], targets)
    torch.testing.assert_close(plain, got, atol=1e-4, rtol=1e-4)


def test_errors_name_the_argument(tiny):
    model, tok = tiny
    s = PromptScorer(copy.deepcopy(model), tok)
    with pytest.raises(ValueError, match="classes must name at least 2"):
        s.class_logprobs(["p"], ["x"], ["a|A"])
    with pytest.raises(ValueError, match="share the token id"):
        s.class_logprobs(["p"], ["x"], ["a|A", "A|b"])
    with pytest.raises(ValueError, match="share the token id"):     # byte tokens: first tokens "y" / "y"
        s.class_logprobs(["p"], ["x"], ["yes|Yes", "yeah|no"])
    with pytest.raises(ValueError, match="inputs must be a list of strings"):
        s.class_logprobs(["p"], ["x", 3], ["a", "b"])
    with pytest.raises(ValueError, match="targets must have one entry per context"):
        s.target_logprobs(["c", "d"], ["t"])
    with pytest.raises(ValueError, match="tok must be a tokenizer"):
        PromptScorer(model, None)


@pytest.mark.slow
def test_smollm2_shared_equals_plain_and_sdpa():
    from mops_kernels import load_backbone
    model, tok = load_backbone()
    prompts = ["", "Answer the question.", "Read the following sentence, then determine whether you return to "
               "the starting point. Count every step and every turn carefully."]
    inputs = ["If you follow these instructions, do you return to the starting point? Take 2 steps. "
              "Take 2 steps back.\nOptions:\n- Yes\n- No", "Is the sky blue?\nOptions:\n- Yes\n- No",
              "Which sentence has the correct adjective order:\nOptions:\n(A) big old red box\n(B) red old big box"]
    classes = ["yes|Yes", "no|No"]
    shared = PromptScorer(model, tok)
    got = shared.class_logprobs(prompts, inputs, classes)
    assert shared.stats.shared_pairs == 6
    plain = PromptScorer(model, tok, share=False).class_logprobs(prompts, inputs, classes)
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), plain.argmax(-1))
    model.set_attn_implementation("sdpa")                 # transformers' attention on the same weights
    try:
        with torch.no_grad():
            want = _transformers_class_logprobs(model, tok, prompts, inputs, classes)
    finally:
        model.set_attn_implementation("mops")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
