"""`gptforge serve`: an OpenAI-compatible HTTP server over the batching engine (needs the `serve` extra)."""
