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
[(r-1) * local_steps, r * local_steps) of the experiment's recipe (warm-up + cosine over all
rounds * local_steps steps, clipping, the arm's own lr groups), on the arm the server names
(mops_kernels.training.experiment: single_kP, single_EP, mops, iapt). The gate is pretrained centrally
before round 1 (run_federated_arm) and arrives in the initial parameters. The data order is a function
of (seed, partition, step). The AdamW state is local to the round (fresh each round; plain FedAvg).

What the server sends (the round's ConfigRecord, SERVER_SETTINGS): the arm and its shape, the
recipe and the step window; Flower adds server-round. What stays with the client (CLIENT_LOCAL:
data, backbone, backbone-config, threads) comes from the client's own node config (`flwr-supernode
--node-config "data=... threads=2"`), or, in the one-machine simulation where Flower gives every
node the same config, from the environment (MOPS_FL_DATA, MOPS_FL_BACKBONE, MOPS_FL_BACKBONE_CONFIG,
MOPS_FL_THREADS): a server message naming any of them is refused, so a server cannot point a client
at another file or make it spawn threads.

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
from .trainer import PromptTrainer

# What the server sends each round, with the defaults of a missing key.
SERVER_SETTINGS = {
    "arm": "mops", "experts": 4, "prompt-len": 8, "top-k": 2, "gate-layer": 10, "inject-from": 11,
    "gate-hidden": 64, "iapt-bottleneck": 16, "max-len": 128, "max-train": 0, "separator": "\nAnswer:",
    "local-steps": 5, "rounds": 4, "batch-size": 4, "lr": 1e-2, "seed": 0, "warmup-frac": 0.1,
    "min-lr-ratio": 0.1, "clip-norm": 1.0, "layer-log-weight": -6.0, "layer-weight-lr": 0.05,
    "rational-lr": 1e-4, "iapt-lr-scale": 0.1,
}
# What each client decides for itself: its node config, else the environment (simulation).
CLIENT_LOCAL = {"data": "", "backbone": "", "backbone-config": "", "threads": 1}
LOCAL_ENV = {k: "MOPS_FL_" + k.upper().replace("-", "_") for k in CLIENT_LOCAL}


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


def experiment_config(c: dict):
    """The ExperimentConfig of a round's settings (SERVER_SETTINGS keys)."""
    from .experiment import ExperimentConfig
    return ExperimentConfig(experts=int(c["experts"]), prompt_len=int(c["prompt-len"]), top_k=int(c["top-k"]),
                            gate_layer=int(c["gate-layer"]), inject_from=int(c["inject-from"]),
                            gate_hidden=int(c["gate-hidden"]), iapt_bottleneck=int(c["iapt-bottleneck"]),
                            max_len=int(c["max-len"]), separator=str(c["separator"]),
                            batch_size=int(c["batch-size"]), steps=int(c["rounds"]) * int(c["local-steps"]),
                            warmup_frac=float(c["warmup-frac"]), min_lr_ratio=float(c["min-lr-ratio"]),
                            clip_norm=float(c["clip-norm"]), layer_log_weight=float(c["layer-log-weight"]),
                            layer_weight_lr=float(c["layer-weight-lr"]), rational_lr=float(c["rational-lr"]),
                            iapt_lr_scale=float(c["iapt-lr-scale"]), checkpoint_every=0)


def client_local(node_config, environ=None) -> dict:
    """CLIENT_LOCAL settings of this client: its node config first, then the environment."""
    environ = os.environ if environ is None else environ
    out = {}
    for k, default in CLIENT_LOCAL.items():
        v = node_config.get(k) if node_config is not None else None
        if v is None or v == "":
            v = environ.get(LOCAL_ENV[k], default)
        out[k] = type(default)(v) if v != "" else default
    return out


def round_settings(server: dict, local: dict) -> dict:
    """One round's settings: the server's (SERVER_SETTINGS keys only) and the client's own."""
    bad = sorted(set(server) & set(CLIENT_LOCAL))
    if bad:
        raise ValueError(f"the server's message names client-local settings {bad}: a client takes those "
                         f"from its own node config, never from the server")
    unknown = sorted(set(server) - set(SERVER_SETTINGS) - {"server-round"})
    if unknown:
        raise ValueError(f"unknown settings {unknown} in the server's message (known: {sorted(SERVER_SETTINGS)})")
    return {**SERVER_SETTINGS, **server, **local}


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
    """The client's encoded training items (max-train per task when > 0; never truncated: too-long
    items are left out, as in the centralized experiment)."""
    items = []
    for t in tasks:
        rows = load_split(c["data"], "train", [t])
        rows = rows[:int(c["max-train"])] if int(c["max-train"]) > 0 else rows
        enc = (encode(tok, r, int(c["max-len"]), separator=str(c["separator"]), truncate=False) for r in rows)
        items += [e for e in enc if e is not None]
    return items


def local_train(c: dict, params: Dict[str, torch.Tensor], partition: int, items: Sequence[dict],
                model, pad_id: int = 0) -> Tuple[Dict[str, torch.Tensor], dict]:
    """One client's round: load `params`, train local-steps steps, return (params, metrics)."""
    from .experiment import build_arm, train_config
    rnd, local = int(c["server-round"]), int(c["local-steps"])
    cfg = experiment_config(c)
    prompts = build_arm(model, c["arm"], cfg, None, seed=int(c["seed"]))      # shapes; values from params
    load_prompt_params(prompts, params)
    tc = train_config(cfg, float(c["lr"]), int(c["seed"]) * 1000 + partition)
    before = backbone_checksum(model)
    trainer = PromptTrainer(model, prompts, items, tc, pad_id=pad_id)
    trainer.step = (rnd - 1) * local
    try:
        losses = trainer.train(stop_at=rnd * local)
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
        c = round_settings(dict(msg.content["config"]), client_local(context.node_config))
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

    round_settings(client_config, {})            # the errors of a bad config, before any client runs
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
                          min_available_nodes=num_clients)
        res = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=num_rounds,
                             train_config=ConfigRecord({**SERVER_SETTINGS, **client_config}))
        result["arrays"] = res.arrays.to_torch_state_dict()
        result["train_metrics"] = {r: dict(m) for r, m in res.train_metrics_clientapp.items()}

    return app


def run_federated(initial: Dict[str, torch.Tensor], num_clients: int, num_rounds: int, client_config: dict,
                  ray_cpus: int = 2, verbose: bool = False, local: Optional[dict] = None
                  ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """FedAvg with Flower's simulation engine on this machine; -> (final parameters, metrics per round).
    client_config: SERVER_SETTINGS keys; local: the simulated clients' own CLIENT_LOCAL settings
    (passed through the environment the Ray workers inherit, as a SuperNode's node config would)."""
    from flwr.simulation import run_simulation
    result: dict = {}
    server = make_server_app(initial, num_clients, num_rounds, {"rounds": num_rounds, **client_config}, result)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    bad = sorted(set(local or {}) - set(CLIENT_LOCAL))
    if bad:
        raise ValueError(f"unknown client-local settings {bad} (known: {sorted(CLIENT_LOCAL)})")
    saved = {k: os.environ.get(LOCAL_ENV[k]) for k in CLIENT_LOCAL}
    for k, v in (local or {}).items():
        os.environ[LOCAL_ENV[k]] = str(v)
    try:
        _simulate(run_simulation, server, num_clients, ray_cpus, verbose)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(LOCAL_ENV[k], None)
            else:
                os.environ[LOCAL_ENV[k]] = v
    if "arrays" not in result:
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return result["arrays"], result["train_metrics"]


def _simulate(run_simulation, server, num_clients, ray_cpus, verbose):
    run_simulation(server_app=server, client_app=client_app, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": ray_cpus, "num_gpus": 0,
                                                 "include_dashboard": False,
                                                 "object_store_memory": 100 * 2 ** 20}},
                   verbose_logging=verbose)
