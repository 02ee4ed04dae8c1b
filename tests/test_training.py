"""MoPs training on a tiny 4-bit backbone (load_backbone(config=...)): frozen backbone, gradients to
the bank and the gate, gate pretraining, exact resume, interrupt checkpoint, baseline, evaluation."""
import os

import pytest
import torch

from mops_kernels.integrations.backbone import load_backbone
from utils import task_items
from mops_kernels.training.trainer import CHECKPOINT, PromptTrainer, TrainConfig, build_prompts

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
KW = dict(num_experts=3, prompt_len=5, top_k=2, gate_layer=1, inject_from=2, gate_hidden=16)


def _items(n=23, seed=1):
    return task_items(n, seed)


def _setup(mode="mops", **cfg):
    model, _ = load_backbone(config=dict(CFG))
    prompts = build_prompts(model, mode, seed=0, **KW)
    conf = TrainConfig(**{**dict(steps=4, gate_steps=1, batch_size=5, lr=1e-2, progress=False), **cfg})
    return model, prompts, PromptTrainer(model, prompts, _items(), conf)


def test_backbone_frozen_and_gradients_reach_bank_and_gate():
    model, prompts, tr = _setup()
    assert all(not p.requires_grad for p in model.parameters())
    loss = tr._forward(tr.batch_at(0)).loss
    loss.backward()
    for name, p in prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())
    unfrozen = load_backbone(config=dict(CFG))[0]
    next(unfrozen.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        PromptTrainer(unfrozen, build_prompts(unfrozen, "mops", **KW), _items(), TrainConfig())


def test_gate_pretraining_lowers_routing_loss_and_touches_only_the_gate():
    model, prompts, tr = _setup(steps=30, gate_steps=30, lr=3e-2)
    bank0 = prompts.bank.keys.detach().clone()
    first = tr.routing_loss(tr.batch_at(0)).item()
    tr.train()
    last = tr.routing_loss(tr.batch_at(0)).item()
    assert last < 0.5 * first, (first, last)
    assert torch.equal(prompts.bank.keys, bank0)


def test_resume_is_exact(tmp_path):
    _, pa, straight = _setup()
    straight.train()
    _, pb, first = _setup()
    first.train(str(tmp_path), stop_at=2)
    assert first.step == 2
    _, pc, resumed = _setup()
    resumed.train(str(tmp_path))              # picks up the checkpoint at step 2
    assert resumed.step == 4
    for (n, a), (_, c) in zip(pa.named_parameters(), pc.named_parameters()):
        assert torch.equal(a, c), n
    assert not torch.equal(pa.bank.keys, pb.bank.keys)  # pb stopped at 2: the test can tell


def test_interrupt_writes_a_checkpoint(tmp_path):
    _, prompts, tr = _setup(checkpoint_every=100)

    def boom(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.train(str(tmp_path), on_step=boom)
    _, p2, tr2 = _setup()
    assert tr2.load_checkpoint(os.path.join(tmp_path, CHECKPOINT)) == 3
    assert torch.equal(p2.bank.values, prompts.bank.values)


def test_baseline_single_prompt_same_size_and_trains():
    model, prompts, tr = _setup(mode="single", steps=6, lr=5e-2)
    mops = build_prompts(model, "mops", **KW)
    assert prompts.gate is None and prompts.bank.num_experts == 1
    assert prompts.bank.keys.numel() == mops.bank.keys.numel()
    items = _items(9, seed=7)
    before = tr.evaluate(items)
    tr.train()
    after = tr.evaluate(items)
    assert set(before["per_task"]) == {0, 1, 2}
    assert after["overall"] != before["overall"]
    assert sum(after["tokens"].values()) == sum(len(it["ids"]) - it["n_input"] for it in items)


def test_evaluate_matches_the_models_loss():
    _, _, tr = _setup()
    items = _items(5, seed=3)
    res = tr.evaluate(items, batch_size=5)
    from mops_kernels.training.data import collate
    with torch.no_grad():
        loss = tr._forward(collate(items, 0)).loss
    assert res["overall"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)


def test_iapt_prompt_source_trains_on_the_instruction_only():
    model, gen, tr = _setup(mode="iapt", steps=3, lr=2e-2)
    assert all(not p.requires_grad for p in model.parameters())
    batch = tr.batch_at(0)
    loss = tr._forward(batch).loss
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the generator reads the instruction tokens only: changing a target token leaves its prompts alone
    seen = []
    hook = gen.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        tr._forward(batch)
        row = int(batch["input_mask"][0].sum())
        batch["input_ids"][0, row] = (batch["input_ids"][0, row] + 1) % 97
        tr._forward(batch)
    hook.remove()
    n = len(seen) // 2
    assert n == len(gen.inject_layers)
    assert torch.allclose(seen[0][0], seen[n][0], atol=1e-6)
    before = {n_: p.detach().clone() for n_, p in gen.named_parameters()}
    tr.train()
    assert all(not torch.equal(before[n_], p) for n_, p in gen.named_parameters())
    assert tr.evaluate(_items(6, seed=5))["overall"] > 1


def test_save_prompts_iapt_round_trip(tmp_path):
    from mops_kernels.training.trainer import load_iapt, save_prompts
    model, _ = load_backbone(config=dict(CFG))
    gen = build_prompts(model, "iapt", seed=3, **KW)
    save_prompts(gen, str(tmp_path))
    back = load_iapt(str(tmp_path))
    assert back.inject_layers == gen.inject_layers and back.bottleneck == gen.bottleneck
    for (n, a), (_, b) in zip(gen.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n


def test_load_shipped(tmp_path, monkeypatch):
    import json
    from mops_kernels import shipped
    paths = {k: str(tmp_path / f"mops_{k}") for k in ("bank", "gate", "meta")}
    monkeypatch.setattr(shipped, "SHIPPED", paths)
    model, _ = load_backbone(config=dict(CFG))
    assert shipped.load_shipped(model) is None                  # nothing shipped: None, no error
    prompts = build_prompts(model, "mops", seed=4, **KW)
    prompts.bank.save(paths["bank"])
    prompts.gate.save(paths["gate"])
    with open(paths["meta"], "w") as f:
        json.dump({"inject_from": prompts.inject_from, "tasks": ["a", "b", "c"]}, f)
    got = shipped.load_shipped(model)
    assert got.inject_from == prompts.inject_from and got.gate.gate_layer == KW["gate_layer"]
    for (n, a), (_, b) in zip(prompts.named_parameters(), got.named_parameters()):
        assert torch.equal(a, b), n
    other, _ = load_backbone(config=dict(CFG, num_hidden_layers=5))
    with pytest.raises(ValueError):
        shipped.load_shipped(other)
