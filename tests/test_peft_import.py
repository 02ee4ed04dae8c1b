"""PEFT prefix-tuning adapters imported as slots (SPEC §5): each row of a mixed batch must equal PEFT
running that row's adapter alone (logits within 1e-4 rel fp32, greedy tokens equal)."""
import json
import os

import pytest
import torch

from _hf_doubles import left_padded, row, tiny_model
from mops_kernels.integrations.hf import attach
from mops_kernels.integrations.peft_import import from_peft

peft = pytest.importorskip("peft")      # capability: peft is an optional dependency


def _save_adapter(model, path, P, projection, seed):
    from peft import PrefixTuningConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                  prefix_projection=projection, encoder_hidden_size=40))
    with torch.no_grad():                # PEFT initialises the table small; make the prefix matter
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 1.5)
    pm.save_pretrained(path)


def _peft_alone(path, ids, mask, **gen):
    from peft import PeftModel
    base = tiny_model()
    pm = PeftModel.from_pretrained(base, path).eval()
    logits = pm(input_ids=ids, attention_mask=mask).logits
    out = pm.generate(input_ids=ids, attention_mask=mask, **gen)
    return logits, out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    paths = []
    for i, proj in enumerate((False, True)):      # one plain table, one through PEFT's prefix MLP
        p = str(root / f"a{i}")
        _save_adapter(tiny_model(), p, P=6, projection=proj, seed=10 + i)
        paths.append(p)
    return paths


def test_mixed_batch_rows_equal_peft_alone(adapters):
    model = tiny_model()
    mops = from_peft(model, adapters)
    assert mops.position_offset == 6
    attach(model, mops)
    ids, mask = left_padded(B=3, pads=(3, 0, 5))
    idx = torch.tensor([[0], [1], [1]], dtype=torch.int32)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, expert_index=idx).logits
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    toks = model.generate(input_ids=ids, attention_mask=mask, expert_index=idx, **gen)[:, ids.shape[1]:]
    for b in range(3):
        i, m = row(ids, mask, b)
        want_logits, want_toks = _peft_alone(adapters[int(idx[b, 0])], i, m, **gen)
        got = logits[b, mask[b].bool()]
        err = ((got - want_logits[0]).norm() / want_logits[0].norm()).item()
        assert err < 1e-4, f"row {b}: rel err {err}"
        assert torch.equal(toks[b], want_toks[0]), f"row {b}"
    plain = tiny_model()(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (plain - logits).abs().max() > 1e-2          # the adapters changed the logits


def test_peft_adapters_beside_a_mops_bank_in_one_engine_equal_peft_alone(adapters):
    """PEFT adapters and a MoPs bank pooled in one Engine (PromptSets), their requests in one batch with
    a plain one: each PEFT request's greedy tokens are PEFT's own, the plain request the bare model's."""
    from _hf_doubles import tiny_mops
    from mops_kernels.serving import Engine
    from mops_kernels.serving.prompt_sets import PromptSets
    model = tiny_model()
    pool = PromptSets({"peft": from_peft(model, adapters), "mops": tiny_mops(model)}, num_layers=4)
    eng = Engine(model, pool, max_batch=4, max_len=40, eos_token_id=[])
    ids, mask = left_padded(B=4, pads=(0, 0, 0, 0))
    asks = [("peft", [0]), ("mops", None), ("peft", [1]), (None, None)]
    reqs = [eng.submit(ids[b], prompt_set=s, expert_index=ei, max_new_tokens=6) for b, (s, ei) in enumerate(asks)]
    eng.run_until_done()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    for b, (s, ei) in enumerate(asks):
        i, m = row(ids, mask, b)
        if s == "peft":
            want = _peft_alone(adapters[ei[0]], i, m, **gen)[1][0].tolist()
        elif s is None:
            want = tiny_model().generate(input_ids=i, attention_mask=m, **gen)[0, i.shape[1]:].tolist()
        else:
            continue
        assert reqs[b].tokens == want, (b, s)


def _write(path, cfg, table=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)
    if table is not None:
        from safetensors.torch import save_file
        save_file({"prompt_embeddings": table}, os.path.join(path, "adapter_model.safetensors"))


def test_errors(adapters, tmp_path):
    model = tiny_model()
    good = json.load(open(os.path.join(adapters[0], "adapter_config.json")))
    lora = str(tmp_path / "lora")
    _write(lora, {"peft_type": "LORA"})
    with pytest.raises(ValueError, match="not PREFIX_TUNING"):
        from_peft(model, [adapters[0], lora])
    other_p = str(tmp_path / "p9")
    _write(other_p, dict(good, num_virtual_tokens=9), torch.randn(9, 4 * 2 * 32))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        from_peft(model, [adapters[0], other_p])
    with pytest.raises(ValueError, match="num_layers"):
        from_peft(tiny_model(layers=3), [adapters[0]])
    bad_table = str(tmp_path / "bad")
    _write(bad_table, good, torch.randn(6, 100))
    with pytest.raises(ValueError, match="prefix table"):
        from_peft(model, [bad_table])
