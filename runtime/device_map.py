"""Where each part of the model lives: one device, or llama.cpp's -ngl partial offload as a per-layer device map.

llama.cpp's convention, kept here: `-ngl N` puts the last N repeating layers (their
weights and their KV cache) on the accelerator and the rest on the CPU; the input
embedding always stays on the CPU (a row lookup gains nothing from a GPU); the output
norm and head go to the accelerator only when N > n_layers (llama.cpp counts the output
as layer n_layers, so N = n_layers + 1, or any larger number, offloads everything).
Hidden states move to the next part's device at each boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from runtime.errors import InvalidRequestError

_LAYER = re.compile(r"blk\.(\d+)\.")


def check_device(device: str | torch.device) -> torch.device:
    """The device, with its index made explicit (cuda -> cuda:N); InvalidRequestError if it does not exist."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidRequestError(
            f"unknown device {str(device)!r} (cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(f"device {dev}: no CUDA device is available here")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise InvalidRequestError(
                f"device {dev}: only {torch.cuda.device_count()} CUDA devices exist"
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequestError(f"device {dev}: MPS is not available here")
    return dev


@dataclass(frozen=True)
class DeviceMap:
    """The device of the input embedding, of each layer (weights and KV cache), and of the output norm and head."""

    embed: torch.device
    layers: tuple[torch.device, ...]
    output: torch.device

    @staticmethod
    def single(n_layers: int, device: str | torch.device) -> DeviceMap:
        """Everything on one device."""
        dev = torch.device(device)
        dev = dev if dev.type == "cpu" else check_device(dev)
        return DeviceMap(dev, (dev,) * n_layers, dev)

    @staticmethod
    def offload(
        n_layers: int,
        n_gpu_layers: int,
        accelerator: str | torch.device,
        host: str | torch.device = "cpu",
    ) -> DeviceMap:
        """llama.cpp's -ngl: the last `n_gpu_layers` layers on `accelerator`, the rest on `host`,
        the output norm and head on `accelerator` when n_gpu_layers > n_layers (checked to exist)."""
        if n_gpu_layers < 0:
            raise InvalidRequestError(f"-ngl/--n-gpu-layers must be >= 0, got {n_gpu_layers}")
        cpu = check_device(host)
        acc = check_device(accelerator) if n_gpu_layers > 0 else cpu
        first = max(0, n_layers - n_gpu_layers)  # first offloaded layer
        layers = tuple(acc if i >= first else cpu for i in range(n_layers))
        return DeviceMap(cpu, layers, acc if n_gpu_layers > n_layers else cpu)

    @property
    def devices(self) -> frozenset[torch.device]:
        return frozenset((self.embed, self.output, *self.layers))

    def of_tensor(self, name: str) -> torch.device:
        """The device of a GGUF tensor, by its name: blk.{i}.* -> layer i; token_embd -> the input."""
        m = _LAYER.match(name)
        if m is not None:
            return self.layers[int(m.group(1))]
        return self.embed if name.startswith("token_embd") else self.output

    def describe(self) -> str:
        """One line for the log, e.g. '18 layers: 0-9 on cpu, 10-17 on cuda:0; output on cpu'."""
        runs: list[tuple[int, int, torch.device]] = []
        for i, d in enumerate(self.layers):
            if runs and runs[-1][2] == d:
                runs[-1] = (runs[-1][0], i, d)
            else:
                runs.append((i, i, d))
        parts = [f"{a}-{b} on {d}" if a != b else f"{a} on {d}" for a, b, d in runs]
        return f"{len(self.layers)} layers: {', '.join(parts)}; input on {self.embed}, output on {self.output}"
