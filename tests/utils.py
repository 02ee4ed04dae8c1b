"""Helpers shared by the tests (import as `from utils import ...`)."""
import torch

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 if both are zero)."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num if den == 0 else num / den


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so unwritten elements cannot pass."""
    return t.fill_(float("nan"))


def task_items(n: int, seed: int = 1, n_in=(4, 11), n_out=(2, 7), tasks: int = 3, vocab: int = 97) -> list:
    """Synthetic encoded training items (data.encode's form) of `tasks` tasks for tiny random
    models: each task's instruction starts with its own token (something a gate can route on)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        task = i % tasks
        a = n_in[0] + int(torch.randint(0, n_in[1] - n_in[0], (1,), generator=g))
        b = n_out[0] + int(torch.randint(0, n_out[1] - n_out[0], (1,), generator=g))
        ids = [10 + task] + torch.randint(20, vocab, (a + b - 1,), generator=g).tolist()
        items.append(dict(ids=ids, n_input=a, label=task))
    return items


def tol_ok(out: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype,
           fp32_tol: float = 1e-4) -> bool:
    """SPEC §6: fp32 rel. err <= fp32_tol; low precision within 2x plain PyTorch's error + 1e-5."""
    if torch.isnan(out).any():
        return False
    if dtype == torch.float32:
        return rel_err(out, ref) <= fp32_tol
    return rel_err(out, ref) <= 2 * rel_err(plain, ref) + 1e-5


# ---- compiling the Triton kernels for a real GPU (sm_90) from this CPU-only machine ----------
# Triton reads TRITON_INTERPRET when a kernel is decorated, so the kernels of a test process are
# interpreted: a child process with TRITON_INTERPRET=0 compiles them with the NVIDIA backend
# (ptxas ships with triton) for GPUTarget("cuda", 90, 32), one process for a whole batch.
try:
    import triton as _triton
    HAS_NVIDIA_BACKEND = "nvidia" in getattr(_triton.backends, "backends", {})
except Exception:  # triton missing
    HAS_NVIDIA_BACKEND = False

_COMPILE = """
import importlib, json, os, sys, traceback
os.environ["TRITON_INTERPRET"] = "0"
import triton
import triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import BaseBackend, GPUTarget
out = []
for spec in json.loads(sys.stdin.read()):
    try:
        kern = getattr(importlib.import_module(spec["module"]), spec["name"])
        consts = {(i,): tl.dtype(v["dtype"]) if isinstance(v, dict) else v
                  for i, v in spec["constexprs"]}
        attrs = {(i,): BaseBackend.parse_attr(a) for i, a in spec["attrs"]}
        src = ASTSource(fn=kern, signature=spec["signature"], constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
        n = len(k.asm.get("cubin") or b"")
        if n and spec.get("cubin_path"):   # kept for the SASS budgets (tests/test_sass_budget.py)
            with open(spec["cubin_path"], "wb") as f:
                f.write(k.asm["cubin"])
        out.append({"ok": n > 0, "cubin_bytes": n, "error": "" if n else "no cubin"})
    except Exception:
        out.append({"ok": False, "cubin_bytes": 0, "error": traceback.format_exc()[-3000:]})
print("RESULTS" + json.dumps(out))
"""


def sm90_spec(kernel, signature: dict, constexprs: dict, attrs: dict | None = None,
              options: dict | None = None) -> dict:
    """One compile job: signature {arg name: Triton type or "constexpr"} in the kernel's argument
    order, constexprs {name: value} (ints, bools, None, str or triton dtypes), attrs {name: "D"}
    (Triton's divisible-by-16 mark), options {"num_warps": 4, ...}."""
    names = list(signature)
    def enc(v):
        return {"dtype": str(v)} if type(v).__name__ == "dtype" else v
    return {"module": kernel.fn.__module__, "name": kernel.fn.__name__, "signature": signature,
            "constexprs": [(names.index(n), enc(v)) for n, v in constexprs.items()],
            "attrs": [(names.index(n), a) for n, a in (attrs or {}).items() if a],
            "options": {"num_warps": 4, **(options or {})}}


def compile_specs_for_sm90(specs: list) -> list:
    """Compile every sm90_spec in one child process: [{"ok", "cubin_bytes", "error"}] per spec
    (a spec with a "cubin_path" key also gets its cubin written there)."""
    import json, os, subprocess, sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": root}
    run = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(specs), env=env,
                         capture_output=True, text=True, timeout=900)
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULTS")]
    assert run.returncode == 0 and line, run.stderr[-3000:]
    return json.loads(line[-1][len("RESULTS"):])


def compile_for_sm90(kernel, arg_type, consts, num_warps=4):
    """Compile one @triton.jit kernel for sm_90: arg_type(name) gives each runtime argument's
    Triton type ("*fp32", "i32"), consts {name: value} the constexprs."""
    import inspect
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: ("constexpr" if n in consts else arg_type(n)) for n in names}
    res = compile_specs_for_sm90([sm90_spec(kernel, sig, consts, options={"num_warps": num_warps})])
    assert res[0]["ok"], res[0]["error"]


# ---- SASS: the speed proxy without a GPU -----------------------------------------------------
# A memory-bound kernel reaches the HBM roofline only if an SM can issue its instructions as fast
# as the bytes arrive: count the SASS instructions of the kernel's main loop per 16 B it reads.
# nvdisasm comes with pip (nvidia-cuda-nvdisasm, pinned in requirements.txt) and with Triton's
# NVIDIA backend; nvcc from the CUDA toolkit (or $NVCC).
def nvdisasm_path():
    """The nvdisasm binary ($NVDISASM, the pip package, Triton's copy, then PATH), or None."""
    import glob, os, shutil, sys
    cands = [os.environ.get("NVDISASM", "")]
    for base in sys.path:
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "bin", "nvdisasm")))
        cands.append(os.path.join(base, "nvidia", "cuda_nvdisasm", "bin", "nvdisasm"))
        cands.append(os.path.join(base, "triton", "backends", "nvidia", "bin", "nvdisasm"))
    cands.append(shutil.which("nvdisasm") or "")
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def nvcc_path():
    """nvcc ($NVCC, PATH, /usr/local/cuda/bin), or None."""
    import os, shutil
    for c in (os.environ.get("NVCC", ""), shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def sass_of(cubin_path) -> str:
    """The SASS text of every kernel in a cubin (nvdisasm -c)."""
    import subprocess
    tool = nvdisasm_path()
    assert tool, "nvdisasm not found (pip install nvidia-cuda-nvdisasm)"
    run = subprocess.run([tool, "-c", str(cubin_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def sass_functions(sass: str) -> dict:
    """{kernel (mangled) name: [its SASS lines]} of an nvdisasm listing."""
    import re
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\S+):\s*$", line)
        if m:
            cur = out.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(line)
    return out


def sass_loops(lines, bodies: bool = False) -> list:
    """Every loop of one kernel's SASS: (first address, back-edge address, instruction count) for
    each branch to a label at or before it (NOPs not counted); bodies=True adds a 4th element, the
    loop's instruction texts (to tell loops apart by what they load or multiply)."""
    import re
    labels, instrs = {}, []          # label -> index of the next instruction; [(addr, text)]
    for line in lines:
        lab = re.match(r"\s*(\.L\w+):", line)
        if lab:
            labels[lab.group(1)] = len(instrs)
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);?\s*$", line)
        if ins and ins.group(2):
            instrs.append((int(ins.group(1), 16), ins.group(2)))
    loops = []
    for i, (addr, text) in enumerate(instrs):
        br = re.search(r"\bBRA\b.*`\((\.L\w+)\)", text)
        if br and br.group(1) in labels and labels[br.group(1)] <= i:
            start = labels[br.group(1)]
            body = [t for _, t in instrs[start:i + 1] if not re.match(r"(@!?U?P\w+\s+)?NOP\b", t)]
            loops.append((instrs[start][0], addr, len(body)) + ((body,) if bodies else ()))
    return loops


def count_loop_instructions(sass: str, function: str) -> int:
    """SASS instructions of one iteration of the main loop of the kernel whose mangled name
    contains `function` (exactly one must): the largest innermost loop (one that contains no
    other back-edge), so a remainder loop or an epilogue loop is not taken for it."""
    funcs = {k: v for k, v in sass_functions(sass).items() if function in k}
    assert len(funcs) == 1, f"{function!r} matches {sorted(funcs)} (of {sorted(sass_functions(sass))})"
    loops = sass_loops(next(iter(funcs.values())))
    assert loops, f"no loop (backward branch) in {function}"
    inner = [lp for lp in loops
             if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] and o != lp for o in loops)]
    return max(n for _, _, n in inner)
