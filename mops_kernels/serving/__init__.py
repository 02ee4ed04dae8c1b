"""Serving: the continuous-batching Engine (engine.py) and its parts, and the OpenAI-compatible HTTP
front-end (openai_api.py, imports FastAPI only when used)."""
from .engine import Engine
from .prompt_sets import PromptSets
from .scheduler import QueueFull, Request, summarize

__all__ = ["Engine", "PromptSets", "QueueFull", "Request", "summarize"]
