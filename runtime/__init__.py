"""gguf-serve's engine: GGUF loading, tokenization, model execution and sampling, free of any web framework."""

import os

# Before torch loads OpenMP (importing this package comes first in every entry point): its
# threads then sleep between torch's parallel regions instead of spinning for ~1 ms after
# each, on the cores the quantized kernels' own threads run on next (a prompt GEMM at 2
# threads: 97 GMAC/s with spinning, 156-163 without). An explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
