"""The samplers of llama.cpp's chain, each batched over the rows that use it; runtime/sampler.py runs the chain."""
