"""The MoPs bank + gate shipped in the package, trained by `python/experiment.py --small --ship` on the
4-bit SmolLM2-135M (see README, "Training"): mops_kernels/data/mops_{bank,gate}.safetensors and
mops_kernels/data/mops.json (placement, the task names, the gate's routing on validation, the command).
A product of training, read by the demo and by users: it sits beside the modules it builds, not in
training/ (`mops_kernels.training.shipped` still names the same functions).

    prompts = load_shipped(model)          # MixtureOfPrompts ready for mops_kernels.attach, or None
    attach(model, prompts)
"""
from __future__ import annotations

import json
import os
from typing import Optional

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SHIPPED = {"bank": os.path.join(DATA, "mops_bank.safetensors"),
           "gate": os.path.join(DATA, "mops_gate.safetensors"),
           "meta": os.path.join(DATA, "mops.json")}


def shipped_info() -> Optional[dict]:
    """mops.json of the shipped bank (tasks, routing, validation ppl, command), or None when absent."""
    if not os.path.isfile(SHIPPED["meta"]):
        return None
    with open(SHIPPED["meta"]) as f:
        return json.load(f)


def load_shipped(model=None, device=None):
    """The shipped MixtureOfPrompts (bank + smart gate), or None when its files are absent.

    With `model`, the prompts are put on its device, the bank in its activation dtype (bf16 on a GPU
    backbone), and checked against it (ValueError naming the mismatch: the bank was trained for
    SmolLM2-135M's 30 layers, 3 KV heads of 64, hidden 576)."""
    from .modules.prompts import MixtureOfPrompts, PromptBank, SmartGate, model_placement
    info = shipped_info()
    if info is None or not all(os.path.isfile(SHIPPED[k]) for k in ("bank", "gate")):
        return None
    dtype = None
    if model is not None:
        m_device, dtype = model_placement(model)
        device = device or m_device
    bank = PromptBank.load(SHIPPED["bank"], device=device, dtype=dtype)
    gate = SmartGate.load(SHIPPED["gate"], device=device)
    prompts = MixtureOfPrompts(bank, gate, info["inject_from"], info.get("position_offset", 0))
    if model is not None:
        prompts.check_compatible(model)
    return prompts.eval()
