"""Kernels and their dispatchers. Imports nothing from transformers."""
