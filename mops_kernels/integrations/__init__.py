"""The only layer that imports transformers / peft (guarded, lazily)."""
