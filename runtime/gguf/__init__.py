"""GGUF reading on the `gguf` package: the file, its tensor types and the tensor-name maps."""

from runtime.gguf.reader import GGUFFile, TensorInfo

__all__ = ["GGUFFile", "TensorInfo"]
