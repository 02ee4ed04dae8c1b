"""Chat prompts used by python/demo.py and the backbone parity tests (one place, so both measure
the same thing). Plain data: no model, no tokenizer."""

EXAMPLE_PROMPTS = (
    "Give me three tips for learning Python.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "What is 17 times 23?",
    "Name a famous painting by Leonardo da Vinci.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
)
