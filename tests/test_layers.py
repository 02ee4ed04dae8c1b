"""The package's layers (README "Layout", issue 15 item 5): one registry per op that `pick` reads,
per-op MOPS_BACKEND, one op per ops file, modules never importing integrations, no private name
imported across rooms, one model-family table, one head-dim helper, training reading the table."""
import ast
import os
import pathlib

import pytest
import torch

import mops_kernels
from mops_kernels import _backend

PKG = pathlib.Path(__file__).resolve().parents[1] / "mops_kernels"
ROOMS = ("ops", "modules", "integrations", "training")


def _sources():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _room(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else "root"


def _imports(path):
    """(absolute module, imported names) of every import statement of a package file."""
    tree = ast.parse(path.read_text())
    pkg_parts = ["mops_kernels", *path.relative_to(PKG).parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names]


def _room_of_module(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] != "mops_kernels":
        return "external"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else "root"


# --------------------------------------------------------------------------------------------
# Imports between rooms
# --------------------------------------------------------------------------------------------
def test_modules_and_ops_never_import_integrations_or_training():
    bad = []
    for p in _sources():
        if _room(p) not in ("ops", "modules"):
            continue
        for mod, names in _imports(p):
            targets = [mod] + [f"{mod}.{n}" for n in names]
            if any(".integrations" in t or ".training" in t or t.startswith(("transformers", "peft"))
                   for t in targets):
                bad.append(f"{p.relative_to(PKG)}: {mod} {names}")
    assert not bad, bad


def test_no_private_name_imported_across_rooms():
    """A helper shared by two rooms is public. The root's own infrastructure modules (_backend,
    _C) are package-private, not a room's private helpers."""
    bad = []
    for p in _sources():
        here = _room(p)
        for mod, names in _imports(p):
            there = _room_of_module(mod)
            if there in ("external", here):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__") and n not in ("_backend", "_C"):
                    bad.append(f"{p.relative_to(PKG)} imports {n} from {mod}")
    assert not bad, bad


def test_modules_import_without_integrations_loaded():
    import subprocess
    import sys
    code = ("import sys, mops_kernels.modules.prompts, mops_kernels.modules.int4_linear;"
            "print(sorted(m for m in sys.modules if m.startswith(('mops_kernels.integrations', 'transformers', 'peft'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------------------------
# One table, one helper
# --------------------------------------------------------------------------------------------
def _string_tuples(path):
    """Literal tuples/lists/sets/dict keys of a file that name two or more model families."""
    fams = {"llama", "mistral", "qwen2"}
    for node in ast.walk(ast.parse(path.read_text())):
        elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else \
            node.keys if isinstance(node, ast.Dict) else None
        if elts:
            names = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(names & fams) >= 2:
                yield node.lineno


def test_one_model_family_table():
    from mops_kernels import families
    from mops_kernels.integrations import backbone, gguf_import, hf
    tables = [f"{p.relative_to(PKG)}:{line}" for p in _sources() for line in _string_tuples(p)]
    assert tables == ["families.py:" + str(next(_string_tuples(PKG / "families.py")))], tables
    assert hf.FAMILIES is families.FAMILIES
    assert backbone.HF_ARCHITECTURES == tuple(families.FAMILIES)
    assert set(gguf_import.SUPPORTED_ARCHITECTURES) == {n for n, f in families.FAMILIES.items() if f.gguf}


def test_one_head_dim_helper():
    """`hidden_size // num_attention_heads` is written once (families.head_dim). integrations/engine.py
    is being moved by another branch (h2-server: serving/), which then calls head_dim."""
    bad = []
    for p in _sources():
        if p.relative_to(PKG).as_posix() in ("families.py", "integrations/engine.py"):
            continue
        text = p.read_text()
        if "// cfg.num_attention_heads" in text or "hidden_size // " in text and "num_attention_heads" in text:
            bad.append(str(p.relative_to(PKG)))
    assert not bad, bad


def test_head_dim_and_model_dims():
    from types import SimpleNamespace as NS
    from mops_kernels.families import head_dim, model_dims
    assert head_dim(NS(hidden_size=96, num_attention_heads=6, head_dim=None)) == 16
    assert head_dim(NS(hidden_size=96, num_attention_heads=6, head_dim=24)) == 24
    m = NS(config=NS(hidden_size=96, num_attention_heads=6, num_key_value_heads=None, num_hidden_layers=3))
    assert model_dims(m) == dict(num_layers=3, hidden_size=96, num_kv_heads=6, head_dim=16)
    with pytest.raises(ValueError, match="config"):
        model_dims(torch.nn.Linear(2, 2))


def test_training_reads_the_family_table():
    text = "".join(p.read_text() for p in (PKG / "training").glob("*.py"))
    assert "model.model.layers" not in text and ".model.layers[" not in text


def test_shipped_loader_and_demo_prompts_have_moved():
    from mops_kernels import examples, shipped
    from mops_kernels.integrations import backbone
    from mops_kernels.training import shipped as old
    assert old.load_shipped is shipped.load_shipped            # the old name still works
    assert not hasattr(backbone, "EXAMPLE_PROMPTS") and len(examples.EXAMPLE_PROMPTS) >= 8
    assert os.path.dirname(shipped.DATA) == str(PKG)


# --------------------------------------------------------------------------------------------
# One op per ops file, one registry
# --------------------------------------------------------------------------------------------
def test_one_op_per_ops_file():
    """Every op of _backend.OPS is registered by ops/<op>.py, and only there."""
    import importlib
    where = {}
    for p in sorted((PKG / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "register" \
                    and node.args and isinstance(node.args[0], ast.Constant):
                where.setdefault(node.args[0].value, set()).add(p.stem)
    assert {op: {op} for op in _backend.OPS} == where, where
    for op in _backend.OPS:
        mod = importlib.import_module(f"mops_kernels.ops.{op}")
        assert callable(getattr(mod, op))
        assert set(_backend.registered(op)) >= {"torch"}, op


@pytest.fixture
def clean_picks(monkeypatch):
    monkeypatch.setattr(_backend, "_picked", {})
    monkeypatch.setattr(_backend, "_announced", set())
    monkeypatch.delenv("MOPS_BACKEND", raising=False)
    return monkeypatch


def test_a_new_backend_is_one_registration(clean_picks):
    """Registering an implementation makes `pick` offer it; nothing else changes."""
    from mops_kernels.ops import gate_topk as GT
    saved = _backend.registered("gate_topk")
    calls = []

    def fake(hidden, mask, w1, b1, w2, b2, k, activation):
        calls.append(hidden.shape)
        return GT._gate_topk_torch(hidden, mask, w1, b1, w2, b2, k, activation)
    try:
        _backend.register("gate_topk", "cpu", fake, supports=lambda *a: True)
        if not _backend.has_extension():
            pytest.skip("the cpu backend needs the compiled extension to be available")
        hidden, mask = torch.randn(3, 5, 8), torch.ones(3, 5)
        w1, b1, w2, b2 = torch.randn(7, 8), torch.randn(7), torch.randn(4, 7), torch.randn(4)
        GT.gate_topk(hidden, mask, w1, b1, w2, b2, 2)
        assert calls == [(3, 5, 8)]                    # the unforced CPU order tries cpu first
        clean_picks.setenv("MOPS_BACKEND", "gate_topk:torch")
        GT.gate_topk(hidden, mask, w1, b1, w2, b2, 2)
        assert len(calls) == 1
    finally:
        _backend._REGISTRY["gate_topk"] = saved
        _backend._picked.clear()


def test_register_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown op"):
        _backend.register("gate_top_k", "torch", lambda: None)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.register("gate_topk", "tpu", lambda: None)


@pytest.mark.parametrize("spec,default,per_op", [
    ("cpu", "cpu", {}),
    ("int4_matmul:cpu,prefix_attention:torch", None, {"int4_matmul": "cpu", "prefix_attention": "torch"}),
    (" CPU , gate_topk:torch ", "cpu", {"gate_topk": "torch"}),
])
def test_mops_backend_per_op(clean_picks, spec, default, per_op):
    assert _backend.parse_forced(spec) == (default, per_op)
    clean_picks.setenv("MOPS_BACKEND", spec)
    for op in _backend.OPS:
        assert _backend.forced(op) == per_op.get(op, default)


def test_dispatch_sees_mops_backend_set_at_any_time(clean_picks):
    """dispatch memoises on MOPS_BACKEND / TRITON_INTERPRET read from os.environ's own store (fast):
    setting, changing or removing either between two calls changes the answer at once."""
    x = torch.randn(2, 64)
    qw = mops_kernels.int4_quantize(torch.randn(8, 64), group_size=32)
    clean_picks.delenv("MOPS_BACKEND", raising=False)
    first = _backend.dispatch("int4_matmul", x.device, x, qw).backend
    clean_picks.setenv("MOPS_BACKEND", "int4_matmul:torch")
    assert _backend._dispatch_env()[0] is not None
    assert _backend.dispatch("int4_matmul", x.device, x, qw).backend == "torch"
    clean_picks.delenv("MOPS_BACKEND")
    assert _backend._dispatch_env()[0] is None
    assert _backend.dispatch("int4_matmul", x.device, x, qw).backend == first


@pytest.mark.parametrize("spec,match", [("gpu", "'gpu' names no backend"),
                                        ("int4_matmul:cpux", "names no backend"),
                                        ("int4matmul:cpu", "unknown op 'int4matmul'"),
                                        ("cpu,torch", "two global backends")])
def test_mops_backend_bad_entries_name_themselves(clean_picks, spec, match):
    clean_picks.setenv("MOPS_BACKEND", spec)
    with pytest.raises(ValueError, match=match):
        _backend.forced("int4_matmul")


def _tiny_attached():
    from mops_kernels import MixtureOfPrompts, attach, load_backbone
    cfg = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model, _ = load_backbone(config=cfg)
    mops = MixtureOfPrompts.for_model(model, num_experts=3, prompt_len=5, top_k=2, gate_layer=0,
                                      inject_from=1, gate_hidden=16)
    attach(model, mops)
    return model


@pytest.mark.skipif(not _backend.has_extension(), reason="needs the compiled extension (cpu backend)")
def test_forced_cpu_names_the_op_and_the_per_op_form(clean_picks):
    """MOPS_BACKEND=cpu cannot run a whole attached forward (gate_topk and prefill attention have no
    C++ kernel): the error says which op and how to force per op; the per-op form then runs, with
    the forced op on its backend."""
    model = _tiny_attached()
    ids = torch.randint(0, 61, (2, 7))
    clean_picks.setenv("MOPS_BACKEND", "cpu")
    with pytest.raises(_backend.BackendUnavailable, match=r"cannot run (gate_topk|prefix_attention) .*"
                                                          r"MOPS_BACKEND=cpu,(gate_topk|prefix_attention):torch"):
        model(input_ids=ids)
    clean_picks.setenv("MOPS_BACKEND", "int4_matmul:cpu,prefix_attention:torch,gate_topk:torch")
    seen = []
    impl = _backend.registered("int4_matmul")["cpu"]
    real = impl.fn
    clean_picks.setitem(_backend._REGISTRY["int4_matmul"], "cpu",
                        _backend.Impl("int4_matmul", "cpu", lambda x, qw: seen.append(1) or real(x, qw),
                                      impl.supports, impl.backward))
    out = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and seen
    clean_picks.setenv("MOPS_BACKEND", "cpu,gate_topk:torch,prefix_attention:torch")
    assert torch.equal(model(input_ids=ids).logits, out)


def test_dispatch_fast_path_answers_as_pick(clean_picks):
    """The memoised candidate order gives pick's answer: the first backend whose `supports` holds,
    the next one when it does not (float64 x: the compiled kernels take fp32/16/bf16 only), the forced
    one, and pick's error when the forced one cannot take the case."""
    from mops_kernels.ops import int4_matmul as IM
    from mops_kernels.ops.quant_format import quantize
    qw = quantize(torch.randn(64, 64) * 0.02, bits=4, group_size=32)
    x32, x64 = torch.randn(1, 64), torch.randn(1, 64, dtype=torch.float64)
    want = "cpu" if _backend.has_extension() else "torch"
    for _ in range(2):                                   # the first call fills the memo, the second reads it
        assert _backend.dispatch("int4_matmul", x32.device, x32, qw).backend == want
        assert _backend.dispatch("int4_matmul", x64.device, x64, qw).backend == "torch"
    clean_picks.setenv("MOPS_BACKEND", "int4_matmul:torch")
    assert _backend.dispatch("int4_matmul", x32.device, x32, qw).backend == "torch"
    if _backend.has_extension():
        clean_picks.setenv("MOPS_BACKEND", "int4_matmul:cpu")
        for _ in range(2):
            with pytest.raises(_backend.BackendUnavailable, match="int4_matmul"):
                IM.int4_matmul(x64, qw)
