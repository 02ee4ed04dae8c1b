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
from mops_kernels.training.federated import (backbone_checksum, client_items, local_train, non_iid_split,
                                             prompt_params)
from mops_kernels.training.trainer import build_prompts

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


@pytest.mark.parametrize("mode", ["mops"])
def test_flower_fedavg_is_the_sample_weighted_mean(tmp_path, mode):
    pytest.importorskip("flwr")
    from mops_kernels.training.federated import run_federated
    data = _cache(tmp_path)
    model, _ = load_backbone(config=dict(CFG))
    crc = backbone_checksum(model)
    prompts = build_prompts(model, mode, num_experts=3, prompt_len=5, top_k=2, gate_layer=1, inject_from=2,
                            gate_hidden=16, seed=0)
    initial = prompt_params(prompts)
    cc = {"data": data, "backbone-config": json.dumps(CFG), "mode": mode, "experts": 3, "prompt-len": 5,
          "top-k": 2, "gate-layer": 1, "inject-from": 2, "gate-hidden": 16, "max-len": 24, "local-steps": 2,
          "gate-steps": 1, "batch-size": 3, "lr": 2e-2, "seed": 0}
    final, history = run_federated(initial, num_clients=2, num_rounds=2, client_config=cc)

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
            items = client_items(cc | {"max-train": 0}, tok, tasks)
            new, metrics = local_train({**cc, "server-round": rnd, "threads": 1}, glob, p, items, model)
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
