"""Deep Language Networks (Sordoni et al., 2023) in-process on shared-prefix scoring (SPEC §7).

    PromptScorer      dln/scoring.py: class_logprobs / target_logprobs, each prompt prefilled once
    load_bbh, TASKS   dln/data.py: the four BBH tasks rebuilt from the bigbench sdist, DLN's splits
    DLN1, DLN2        dln/loop.py: the prompt-learning loops; proposers in dln/proposers.py
"""
from importlib import import_module

_LAZY = {
    "PromptScorer": "mops_kernels.dln.scoring",
    "forward_context": "mops_kernels.dln.scoring",
    "load_bbh": "mops_kernels.dln.data",
    "locate_sdist": "mops_kernels.dln.data",
    "TASKS": "mops_kernels.dln.data",
    "DLN1": "mops_kernels.dln.loop",
    "DLN2": "mops_kernels.dln.loop",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mops_kernels.dln' has no attribute {name!r}")
