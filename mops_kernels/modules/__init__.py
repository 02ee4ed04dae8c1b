"""nn.Modules built on the ops: Int4Linear, the prompt bank, the gate, the IAPT generator."""
from .int4_linear import Int4Linear, replace_linears

__all__ = ["Int4Linear", "replace_linears"]
