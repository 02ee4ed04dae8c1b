"""mops_kernels: fused kernels that let one frozen 4-bit LLM serve many prompt adapters at once.

Public names (SPEC.md): the ops `prefix_attention`, `gate_topk`, `int4_quantize`, `int4_matmul`,
`rational`; the modules `Int4Linear`, `PromptBank`, `SmartGate`, `InstructionPromptGenerator`,
`MixtureOfPrompts`; the Hugging Face side `load_backbone`, `attach`, `detach`, `attached` (a context
manager), `from_peft`, `quantize_` and `MopsQuantConfig` (transformers' `quantization_config`).

Everything is imported lazily: `import mops_kernels` loads neither the compiled extension nor
transformers; each name is resolved on first use.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    # ops (no transformers)
    "prefix_attention": "mops_kernels.ops.prefix_attention",
    "gate_topk": "mops_kernels.ops.gate_topk",
    "rational": "mops_kernels.ops.rational",
    "iapt_generate": "mops_kernels.ops.iapt_generate",
    "int4_matmul": "mops_kernels.ops.int4_matmul",
    "int4_quantize": "mops_kernels.ops.quant_format",
    "int8_quantize": "mops_kernels.ops.quant_format",
    "QuantizedWeight": "mops_kernels.ops.quant_format",
    # modules
    "Int4Linear": "mops_kernels.modules.int4_linear",
    "PromptBank": "mops_kernels.modules.prompts",
    "SmartGate": "mops_kernels.modules.prompts",
    "InstructionPromptGenerator": "mops_kernels.modules.prompts",
    "MixtureOfPrompts": "mops_kernels.modules.prompts",
    # Hugging Face integration (imports transformers)
    "load_backbone": "mops_kernels.integrations.backbone",
    "attach": "mops_kernels.integrations.hf",
    "detach": "mops_kernels.integrations.hf",
    "quantize_": "mops_kernels.integrations.quantize",
    "MopsQuantConfig": "mops_kernels.integrations.quantize",
    "attached": "mops_kernels.integrations.hf",
    "from_peft": "mops_kernels.integrations.peft_import",
    "Engine": "mops_kernels.serving.engine",
    "load_shipped": "mops_kernels.shipped",
    # backends
    "backend_info": "mops_kernels._backend",
}

__all__ = sorted(_LAZY) + ["reference", "__version__"]


def __getattr__(name):
    if name == "reference":
        return import_module("mops_kernels.reference")
    if name in _LAZY:
        mod = import_module(_LAZY[name])
        attr = "describe" if name == "backend_info" else name
        value = getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mops_kernels' has no attribute {name!r}")


def __dir__():
    return __all__
