"""Files validated before use (issue 15 item 4): prompt-module files against their metadata before
anything is allocated; PEFT adapters through PEFT's loaders and against the model they attach to;
the BIG-bench sdist pinned by sha256, fetched as a file, never from a shared writable directory."""
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mops_kernels.modules.prompts import InstructionPromptGenerator, MixtureOfPrompts, PromptBank, SmartGate

BANK_ARGS = dict(num_layers=4, inject_layers=[2, 3], num_experts=3, prompt_len=5, num_kv_heads=2, head_dim=8,
                 dtype="float32", init_std=0.02)


def _write(path, tensors, config):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})
    return str(path)


def _bank_tensors(cfg, **override):
    shape = (len(cfg["inject_layers"]), cfg["num_experts"], cfg["prompt_len"], cfg["num_kv_heads"], cfg["head_dim"])
    t = dict(keys=torch.randn(shape), values=torch.randn(shape),
             lens=torch.full((cfg["num_experts"],), cfg["prompt_len"], dtype=torch.int32))
    t.update(override)
    return t


# --------------------------------------------------------------------------------------------
# Prompt-module files
# --------------------------------------------------------------------------------------------
def test_hostile_bank_file_fails_before_allocating(tmp_path):
    """A file of a few hundred bytes whose metadata asks for 2 x 1.6 GB: refused from the header,
    with the process's peak memory barely moving (measured in a child process)."""
    cfg = dict(BANK_ARGS, inject_layers=[0], num_layers=1, num_experts=1000, prompt_len=400, num_kv_heads=8,
               head_dim=128)
    path = _write(tmp_path / "evil.safetensors",
                  dict(keys=torch.zeros(1), values=torch.zeros(1), lens=torch.zeros(1, dtype=torch.int32)), cfg)
    assert os.path.getsize(path) < 600
    code = textwrap.dedent(f"""
        import resource, sys
        from mops_kernels.modules.prompts import PromptBank
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            PromptBank.load({path!r})
        except ValueError as e:
            print("ValueError:", e)
        print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert "ValueError:" in out.stdout and "tensor keys is F32 [1], the metadata says F32 [1, 1000, 400, 8, 128]" \
        in out.stdout, out.stdout + out.stderr[-2000:]
    grew_kb = int(out.stdout.split("grew_kb")[1])
    assert grew_kb < 100_000, grew_kb


@pytest.mark.parametrize("change,match", [
    (dict(device="cuda"), r"unknown arguments \['device'\]"),
    (dict(__class__="x"), r"unknown arguments \['__class__'\]"),
    (dict(head_dim=None), "lacks \\['head_dim'\\]"),
    (dict(num_experts=True), "num_experts must be a positive int"),
    (dict(inject_layers="2,3"), "inject_layers must be a non-empty list"),
    (dict(dtype="int64"), "dtype must be one of float32, float16, bfloat16, float64"),
    (dict(init_std=float("nan")), "init_std must be a finite number"),
])
def test_bank_metadata_is_a_whitelist_of_checked_arguments(tmp_path, change, match):
    cfg = dict(BANK_ARGS)
    cfg.update(change)
    if change.get("head_dim", 0) is None:
        del cfg["head_dim"]
    path = _write(tmp_path / "b.safetensors", _bank_tensors(BANK_ARGS), cfg)
    with pytest.raises(ValueError, match=match):
        PromptBank.load(path)


@pytest.mark.parametrize("override,match", [
    (dict(lens=torch.tensor([5, 6, 2], dtype=torch.int32)), r"lens must lie in \[0, prompt_len=5\], got \[2, 6\]"),
    (dict(lens=torch.tensor([5, 5, 5])), "tensor lens is I64"),
    (dict(values=torch.randn(2, 3, 5, 2, 8).half()), "tensor values is F16"),
    (dict(keys=torch.full((2, 3, 5, 2, 8), float("nan"))), "tensor keys has non-finite"),
    (dict(extra=torch.zeros(1)), r"holds tensors \['extra', 'keys', 'lens', 'values'\]"),
])
def test_bank_tensors_must_match_the_metadata(tmp_path, override, match):
    path = _write(tmp_path / "b.safetensors", _bank_tensors(BANK_ARGS, **override), BANK_ARGS)
    with pytest.raises(ValueError, match=match):
        PromptBank.load(path)


def test_gate_generator_and_mops_json_are_checked(tmp_path):
    gate = SmartGate(16, 4, 2, 1, gate_hidden=8)
    gate.save(str(tmp_path / "g.safetensors"))
    assert torch.equal(SmartGate.load(str(tmp_path / "g.safetensors")).w1, gate.w1)
    _write(tmp_path / "g2.safetensors", {k: v.detach() for k, v in gate.state_dict().items()},
           dict(gate.config(), gate_hidden=10 ** 6))
    with pytest.raises(ValueError, match=r"tensor w1 is F32 \[8, 16\], the metadata says F32 \[1000000, 16\]"):
        SmartGate.load(str(tmp_path / "g2.safetensors"))
    _write(tmp_path / "g3.safetensors", {k: v.detach() for k, v in gate.state_dict().items()},
           dict(gate.config(), activation="os.system"))
    with pytest.raises(ValueError, match="activation must be one of"):
        SmartGate.load(str(tmp_path / "g3.safetensors"))
    gen = InstructionPromptGenerator(16, 3, [1, 2], bottleneck=4)
    gen.save(str(tmp_path / "i.safetensors"))
    assert torch.equal(InstructionPromptGenerator.load(str(tmp_path / "i.safetensors")).w_up, gen.w_up)
    _write(tmp_path / "i2.safetensors", {k: v.detach() for k, v in gen.state_dict().items()},
           dict(hidden_size=16, num_layers=3, inject_layers=[1, 2], bottleneck=5))
    with pytest.raises(ValueError, match="tensor w_down is F32 \\[2, 16, 4\\]"):
        InstructionPromptGenerator.load(str(tmp_path / "i2.safetensors"))
    bank = PromptBank(**dict(BANK_ARGS, dtype=torch.float32))
    mops = MixtureOfPrompts(bank, SmartGate(16, 3, 2, 1, gate_hidden=8), 2)
    mops.save(str(tmp_path / "m"))
    json.dump(dict(inject_from="2; rm -rf", has_gate=True), open(tmp_path / "m" / "mops.json", "w"))
    with pytest.raises(ValueError, match="inject_from must be an int >= 0"):
        MixtureOfPrompts.load(str(tmp_path / "m"))


# --------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------
def _adapter(tmp_path, base=None, name="a"):
    from peft import PrefixTuningConfig, get_peft_model
    from _hf_doubles import tiny_model
    torch.manual_seed(0)
    pm = get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    path = str(tmp_path / name)
    pm.save_pretrained(path)
    if base is not None:
        cfg_path = os.path.join(path, "adapter_config.json")
        cfg = json.load(open(cfg_path))
        cfg["base_model_name_or_path"] = base
        json.dump(cfg, open(cfg_path, "w"))
    return path


def _named_model(name):
    from _hf_doubles import tiny_model
    model = tiny_model()
    model.config._name_or_path = model.name_or_path = name
    return model


def test_peft_adapter_for_another_base_model_is_refused(tmp_path):
    from mops_kernels.integrations.peft_import import from_peft
    path = _adapter(tmp_path, base="HuggingFaceTB/SmolLM2-360M-Instruct")
    model = _named_model("/models/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match=r"trained on 'HuggingFaceTB/SmolLM2-360M-Instruct' but the model is "
                                         r"'smollm2-135m-instruct' \(pass strict=False"):
        from_peft(model, [path])
    with pytest.warns(UserWarning, match="strict=False"):
        mops = MixtureOfPrompts.from_peft(model, [path], strict=False)
    assert mops.num_experts == 1
    with pytest.raises(ValueError, match="no name_or_path to check it against"):
        from_peft(_named_model(""), [path])
    same = _adapter(tmp_path, base="HuggingFaceTB/SmolLM2-135M-Instruct", name="b")
    assert from_peft(model, [same]).prompt_len == 4          # same model, other spelling of its path


def test_peft_files_are_read_by_peft(tmp_path, monkeypatch):
    """PeftConfig.from_pretrained and load_peft_weights do the reading (a .bin adapter included)."""
    import peft
    import peft.utils
    from mops_kernels.integrations.peft_import import from_peft
    path = _adapter(tmp_path)
    from safetensors.torch import load_file
    sd = load_file(os.path.join(path, "adapter_model.safetensors"))
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    torch.save(sd, os.path.join(path, "adapter_model.bin"))
    calls = []
    real_cfg, real_w = peft.PeftConfig.from_pretrained, peft.utils.load_peft_weights
    monkeypatch.setattr(peft.PeftConfig, "from_pretrained",
                        classmethod(lambda cls, p, **kw: calls.append("config") or real_cfg(p, **kw)))
    monkeypatch.setattr(peft.utils, "load_peft_weights", lambda p, **kw: calls.append("weights") or real_w(p, **kw))
    mops = from_peft(_named_model(""), [path])
    assert calls == ["config", "weights"]
    assert torch.equal(mops.bank.keys[0, 0], sd["prompt_embeddings"].view(4, 8, 2, 16)[:, 0])


# --------------------------------------------------------------------------------------------
# The BIG-bench sdist
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    from mops_kernels.training import data
    blob = b"not really bigbench, but the test pins its hash"
    import hashlib
    monkeypatch.setattr(data, "BIGBENCH_SHA256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"no subprocess (pip) may run: {a}"))
    return data, blob


def test_sdist_is_never_taken_from_a_shared_writable_directory(tmp_path, fake_sdist):
    data, blob = fake_sdist
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / data.BIGBENCH_SDIST).write_bytes(blob)
    os.chmod(shared, 0o777)
    with pytest.warns(UserWarning, match="other users can write there"):
        with pytest.raises(FileNotFoundError):
            data.find_sdist([str(shared)])
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / data.BIGBENCH_SDIST).write_bytes(blob)
    assert data.find_sdist([str(private)]) == str(private / data.BIGBENCH_SDIST)
    (private / data.BIGBENCH_SDIST).write_bytes(blob + b"!")
    with pytest.raises(ValueError, match="is not the pinned bigbench-1.0.0.tar.gz"):
        data.find_sdist([str(private)])


def test_sdist_download_is_pip_by_name_with_the_hash_required(tmp_path, fake_sdist, monkeypatch):
    data, blob = fake_sdist
    calls = []

    def fake_run(cmd, check=False):
        req = cmd[cmd.index("-r") + 1]
        calls.append((cmd, open(req).read()))
        dest = cmd[cmd.index("-d") + 1]
        with open(os.path.join(dest, data.BIGBENCH_SDIST), "wb") as f:
            f.write(blob if len(calls) == 1 else blob + b"tampered")
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    got = data.find_sdist([], download_dir=str(tmp_path / "dl"))
    assert open(got, "rb").read() == blob
    cmd, req = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--require-hashes" in cmd and "--no-deps" in cmd
    assert req.strip() == f"bigbench=={data.BIGBENCH_VERSION} --hash=sha256:{data.BIGBENCH_SHA256}"
    assert not any("://" in c for c in cmd)                 # by name, through pip's own index
    with pytest.raises(ValueError, match="is not the pinned"):
        data.find_sdist([], download_dir=str(tmp_path / "dl2"))
    assert not os.listdir(tmp_path / "dl2")             # nothing left behind
