"""Serving: the batching engine (engine.py, knows no HTTP) and the OpenAI-compatible HTTP layer."""
