"""Federated MoPs on Flower's simulation engine (Ray), tiny random 4-bit Llama, 2 non-IID clients x 2
rounds: the server's parameters after each round are the sample-weighted mean of what the clients
trained (recomputed here with the same local_train), only prompt parameters travel, and no client's
backbone changed."""
import json
import os

import pytest
import torch

from mops_kernels.integrations.backbone import load_backbone
from mops_kernels.training.data import ByteTokenizer
from mops_kernels.training import experiment as ex
from mops_kernels.training.federated import (backbone_checksum, client_items, client_local, local_train,
                                             non_iid_split, prompt_params, round_settings)

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
# client 0 holds t0, t1 (3 + 4 = 7 items), client 1 holds t2, t3 (11 + 9 = 20): unequal weights
COUNTS = {"t0": 3, "t1": 4, "t2": 11, "t3": 9}


def _cache(root):
    words = ["apple", "river", "stone", "cloud", "ember", "flute", "grain", "harbor"]
    for k, (t, n) in enumerate(COUNTS.items()):
        os.makedirs(root / t)
        with open(root / t / "train.jsonl", "w") as f:
            for i in range(n):
                inp = f"task {t}: {' '.join(words[(i + j + k) % 8] for j in range(2 + i % 3))}"
                f.write(json.dumps({"task": t, "input": inp, "target": words[(3 * i + k) % 8]}) + "\n")
    with open(root / "manifest.json", "w") as f:
        json.dump({"tasks": list(COUNTS)}, f)
    return str(root)


def test_non_iid_split():
    tasks = [f"t{i}" for i in range(10)]
    parts = non_iid_split(tasks, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert sum(parts, []) == tasks
    with pytest.raises(ValueError, match="num_clients"):
        non_iid_split(tasks, 11)


def test_client_local_settings_never_come_from_the_server(monkeypatch):
    with pytest.raises(ValueError, match=r"client-local settings \['data', 'threads'\]"):
        round_settings({"arm": "mops", "data": "/elsewhere", "threads": 64}, {})
    with pytest.raises(ValueError, match="unknown settings"):
        round_settings({"armm": "mops"}, {})
    monkeypatch.setenv("MOPS_FL_DATA", "/env/data")
    monkeypatch.setenv("MOPS_FL_THREADS", "3")
    assert client_local({"data": "/node/data"}) == {"data": "/node/data", "backbone": "", "backbone-config": "",
                                                    "threads": 3}
    assert client_local({})["data"] == "/env/data"


@pytest.mark.parametrize("arm", ["mops"])
def test_flower_fedavg_is_the_sample_weighted_mean(tmp_path, arm):
    pytest.importorskip("flwr")
    from mops_kernels.training.federated import run_federated
    data = _cache(tmp_path)
    model, _ = load_backbone(config=dict(CFG))
    crc = backbone_checksum(model)
    tok = ByteTokenizer(CFG["vocab_size"])
    cfg = ex.ExperimentConfig(experts=3, prompt_len=5, top_k=2, gate_layer=1, inject_from=2, gate_hidden=16,
                              iapt_bottleneck=8, max_len=64, batch_size=3)
    items = client_items(round_settings({}, {"data": data}) | {"max-len": 64}, tok, list(COUNTS))
    prompts = ex.build_arm(model, arm, cfg, items, seed=0)
    initial = prompt_params(prompts)
    server = ex.federated_settings(cfg, arm, 2e-2, 0, local_steps=2)
    local = {"data": data, "backbone-config": json.dumps(CFG), "threads": 1}
    final, history = run_federated(initial, num_clients=2, num_rounds=2, client_config=server, local=local)
    cc = {**server, "rounds": 2}

    assert set(final) == set(initial) == {n for n, _ in prompts.named_parameters()}
    assert not any(k.startswith("model.") or "embed" in k for k in final)      # no backbone tensor sent
    assert set(history) == {1, 2} and all(m["backbone-changed"] == 0 for m in history.values())

    # the same two rounds here, client by client
    tok = ByteTokenizer(CFG["vocab_size"])
    parts = non_iid_split(list(COUNTS), 2)
    glob = initial
    for rnd in (1, 2):
        outs, ns = [], []
        for p, tasks in enumerate(parts):
            c = round_settings({**cc, "server-round": rnd}, local)
            items = client_items(c, tok, tasks)
            new, metrics = local_train(c, glob, p, items, model)
            assert metrics["num-examples"] == sum(COUNTS[t] for t in tasks) and metrics["backbone-changed"] == 0
            outs.append(new)
            ns.append(len(items))
        weighted = {k: sum(n * o[k] for n, o in zip(ns, outs)) / sum(ns) for k in glob}
        plain = {k: (outs[0][k] + outs[1][k]) / 2 for k in glob}
        glob = weighted
    # atol 1e-4: the Ray clients run with 1 thread, this process with more, and AdamW's m / sqrt(v)
    # magnifies the float differences of near-zero gradients (seen: 2e-5 on gate.b2, < 1e-6 elsewhere)
    for k in final:
        torch.testing.assert_close(final[k], weighted[k], rtol=1e-4, atol=1e-4, msg=k)
    # the test can tell a weighted mean from a plain one, and from no training at all
    gap = max(float((plain[k] - weighted[k]).abs().max()) for k in final)
    assert gap > 5e-3, gap
    assert any(not torch.allclose(final[k], initial[k]) for k in final)
    assert backbone_checksum(model) == crc
