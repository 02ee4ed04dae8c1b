"""Federated MoPs on Flower: FedAvg over the prompt parameters (bank + gate), non-IID clients.

    from mops_kernels.training.federated import client_app, run_federated, non_iid_split
    arrays, history = run_federated(initial_params, num_clients=5, num_rounds=4,
                                    client_config=dict(data="data/bigbench", mode="mops", ...))

Flower's message API (flwr 1.41): the ServerApp runs Flower's own `FedAvg` strategy
(`flwr.serverapp.strategy.FedAvg`, weighted by the clients' "num-examples"), sending the current
prompt parameters as an `ArrayRecord` and the training settings as the round's `ConfigRecord`;
`client_app` (a `flwr.clientapp.ClientApp`, importable as
`mops_kernels.training.federated:client_app`, so the same object serves real SuperNodes) loads the
frozen backbone once per process, trains the prompts locally with PromptTrainer and replies with the
updated prompt parameters. Only the prompt parameters (`named_parameters()` of the MixtureOfPrompts:
bank.keys, bank.values, gate.*) travel; the frozen backbone never leaves a client, and each client
reports whether its backbone changed while training (it must not: metric "backbone-changed").

Non-IID split: `non_iid_split(tasks, num_clients)` gives client c the c-th contiguous chunk of the task
list (each client holds a few tasks, no task on two clients). A real client may instead name its tasks
in its node config ("tasks", comma-separated); in simulation the partition id picks the chunk.

Local training in round r (1-based): the client continues the global step count, steps
[(r-1) * local_steps, r * local_steps) of PromptTrainer's schedule, so gate pretraining (gate_steps)
happens in the first rounds, exactly as in the centralized schedule; the data order is a function of
(seed, partition, step). The AdamW state is local to the round (fresh each round; plain FedAvg).

The round's ConfigRecord (all settings of the client, sent by the server): data, backbone (GGUF / HF
path, "" = the default SmolLM2), backbone-config (JSON of a random-init config with the
data.ByteTokenizer, for tests), mode,
experts, prompt-len, top-k, gate-layer, inject-from, gate-hidden, max-len, max-train, local-steps,
gate-steps, batch-size, lr, seed, threads; Flower adds server-round.

Simulation: `run_federated` runs `flwr.simulation.run_simulation` with Ray (ray_cpus CPUs, one CPU and
no GPU per client, so at most ray_cpus clients train at a time).
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import ByteTokenizer, encode, load_split, task_names
from .trainer import PromptTrainer, TrainConfig, build_prompts

# Everything a client needs from one round's ConfigRecord, with the defaults of a missing key.
CLIENT_DEFAULTS = {
    "data": "", "backbone": "", "backbone-config": "", "mode": "mops", "experts": 4, "prompt-len": 8,
    "top-k": 2, "gate-layer": 10, "inject-from": 11, "gate-hidden": 64, "max-len": 64, "max-train": 0,
    "local-steps": 5, "gate-steps": 0, "batch-size": 4, "lr": 3e-3, "seed": 0, "threads": 1,
}


def non_iid_split(tasks: Sequence[str], num_clients: int) -> List[List[str]]:
    """Client c holds the c-th of num_clients contiguous, near-equal chunks of `tasks`."""
    if not 1 <= num_clients <= len(tasks):
        raise ValueError(f"num_clients must be in 1..{len(tasks)} (one task at least each), got {num_clients}")
    n, r = divmod(len(tasks), num_clients)
    out, start = [], 0
    for c in range(num_clients):
        size = n + (1 if c < r else 0)
        out.append(list(tasks[start:start + size]))
        start += size
    return out


def prompt_params(prompts) -> Dict[str, torch.Tensor]:
    """The parameters FedAvg averages (bank and gate, or the IAPT generator), detached, on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in prompts.named_parameters()}


def load_prompt_params(prompts, params: Dict[str, torch.Tensor]) -> None:
    own = dict(prompts.named_parameters())
    if set(own) != set(params):
        raise ValueError(f"parameters {sorted(params)} do not match the prompts' {sorted(own)}")
    with torch.no_grad():
        for n, p in own.items():
            if tuple(params[n].shape) != tuple(p.shape):
                raise ValueError(f"{n}: got shape {tuple(params[n].shape)}, the prompts need {tuple(p.shape)}")
            p.copy_(params[n].to(p.device, p.dtype))


def backbone_checksum(model) -> int:
    """CRC32 over every parameter and buffer of the backbone (catches any change to it)."""
    crc = 0
    for t in list(model.parameters()) + list(model.buffers()):
        crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _prompt_kwargs(c: dict) -> dict:
    return dict(num_experts=int(c["experts"]), prompt_len=int(c["prompt-len"]), top_k=int(c["top-k"]),
                gate_layer=int(c["gate-layer"]), inject_from=int(c["inject-from"]),
                gate_hidden=int(c["gate-hidden"]), seed=int(c["seed"]))


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------
_BACKBONES: Dict[Tuple[str, str], tuple] = {}    # one backbone per client process (Ray actor)


def _backbone(c: dict):
    from ..integrations.backbone import load_backbone
    key = (c["backbone"], c["backbone-config"])
    if key not in _BACKBONES:
        if c["backbone-config"]:
            cfg = json.loads(c["backbone-config"])
            _BACKBONES[key] = (load_backbone(config=cfg)[0], ByteTokenizer(cfg["vocab_size"]))
        else:
            _BACKBONES[key] = load_backbone(c["backbone"] or None)
    return _BACKBONES[key]


def client_tasks(node_config, tasks: Sequence[str]) -> List[str]:
    """The tasks of this client: node_config["tasks"] when given, else its non-IID chunk."""
    if node_config.get("tasks"):
        return [t for t in str(node_config["tasks"]).split(",") if t]
    return non_iid_split(tasks, int(node_config["num-partitions"]))[int(node_config["partition-id"])]


def client_items(c: dict, tok, tasks: Sequence[str]) -> List[dict]:
    """The client's encoded training items (max-train per task when > 0)."""
    items = []
    for t in tasks:
        rows = load_split(c["data"], "train", [t])
        rows = rows[:int(c["max-train"])] if int(c["max-train"]) > 0 else rows
        items += [encode(tok, r, int(c["max-len"])) for r in rows]
    return items


def local_train(c: dict, params: Dict[str, torch.Tensor], partition: int, items: Sequence[dict],
                model, pad_id: int = 0) -> Tuple[Dict[str, torch.Tensor], dict]:
    """One client's round: load `params`, train local-steps steps, return (params, metrics)."""
    rnd, local = int(c["server-round"]), int(c["local-steps"])
    prompts = build_prompts(model, c["mode"], **_prompt_kwargs(c))
    load_prompt_params(prompts, params)
    cfg = TrainConfig(steps=rnd * local, gate_steps=int(c["gate-steps"]) if c["mode"] == "mops" else 0,
                      batch_size=int(c["batch-size"]), lr=float(c["lr"]),
                      seed=int(c["seed"]) * 1000 + partition, checkpoint_every=0, progress=False)
    before = backbone_checksum(model)
    trainer = PromptTrainer(model, prompts, items, cfg, pad_id=pad_id)
    trainer.step = (rnd - 1) * local
    try:
        losses = trainer.train()
    finally:
        trainer.close()
    metrics = {"num-examples": len(items), "train-loss": sum(losses) / max(1, len(losses)),
               "backbone-changed": int(backbone_checksum(model) != before)}
    return prompt_params(prompts), metrics


def _make_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        c = {**CLIENT_DEFAULTS, **dict(msg.content["config"])}
        torch.set_num_threads(max(1, int(c["threads"])))
        model, tok = _backbone(c)
        tasks = client_tasks(context.node_config, task_names(c["data"]))
        items = client_items(c, tok, tasks)
        pad_id = tok.pad_token_id or 0
        params = msg.content["arrays"].to_torch_state_dict()
        partition = int(context.node_config.get("partition-id", 0))
        new, metrics = local_train(c, params, partition, items, model, pad_id)
        return Message(content=RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    return app


try:
    client_app = _make_client_app()     # `flwr run` / SuperNodes: mops_kernels.training.federated:client_app
except ImportError:                     # flwr not installed: the rest of the module still works
    client_app = None


# --------------------------------------------------------------------------------------------
# Server side and the one-machine simulation
# --------------------------------------------------------------------------------------------
def make_server_app(initial: Dict[str, torch.Tensor], num_clients: int, num_rounds: int,
                    client_config: dict, result: dict):
    """A ServerApp running FedAvg over `initial` for num_rounds with every client each round; it
    fills result["arrays"] (the final parameters, torch) and result["train_metrics"] per round."""
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    bad = sorted(set(client_config) - set(CLIENT_DEFAULTS))
    if bad:
        raise ValueError(f"unknown client settings {bad} (known: {sorted(CLIENT_DEFAULTS)})")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
                          min_available_nodes=num_clients)
        res = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=num_rounds,
                             train_config=ConfigRecord({**CLIENT_DEFAULTS, **client_config}))
        result["arrays"] = res.arrays.to_torch_state_dict()
        result["train_metrics"] = {r: dict(m) for r, m in res.train_metrics_clientapp.items()}

    return app


def run_federated(initial: Dict[str, torch.Tensor], num_clients: int, num_rounds: int, client_config: dict,
                  ray_cpus: int = 2, verbose: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """FedAvg with Flower's simulation engine on this machine; -> (final parameters, metrics per round)."""
    from flwr.simulation import run_simulation
    result: dict = {}
    server = make_server_app(initial, num_clients, num_rounds, client_config, result)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=server, client_app=client_app, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": ray_cpus, "num_gpus": 0,
                                                 "include_dashboard": False,
                                                 "object_store_memory": 100 * 2 ** 20}},
                   verbose_logging=verbose)
    if "arrays" not in result:
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return result["arrays"], result["train_metrics"]
