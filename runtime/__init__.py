"""gguf-serve's engine: GGUF loading, tokenization, model execution and sampling, free of any web framework."""
