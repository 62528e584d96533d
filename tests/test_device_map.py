"""-ngl partial offload: llama.cpp's layer placement as a per-layer device map, split models equal to unsplit ones."""

from __future__ import annotations

import pytest
import torch

from http_api.cli import UsageError, parse_args
from runtime.config import EngineConfig
from runtime.device_map import DeviceMap, check_device
from runtime.engine import Engine
from runtime.errors import InvalidRequestError
from runtime.loader import load_model
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import write_tiny_gguf

CPU, META = torch.device("cpu"), torch.device("meta")  # meta: a second device that always exists
GREEDY = SamplingParams(temperature=0.0, n_predict=16, ignore_eos=True)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")


@pytest.mark.parametrize(
    "ngl, on_accel, output",
    [(0, [], CPU), (2, [4, 5], CPU), (6, [0, 1, 2, 3, 4, 5], CPU), (7, [0, 1, 2, 3, 4, 5], META), (99, [0, 1, 2, 3, 4, 5], META)],
)  # fmt: skip
def test_last_layers_go_to_the_accelerator(ngl, on_accel, output):
    m = DeviceMap.offload(6, ngl, "meta")
    assert [i for i, d in enumerate(m.layers) if d == META] == on_accel
    assert m.output == output and m.embed == CPU  # the input embedding stays on the CPU
    assert m.of_tensor("blk.5.ffn_down.weight") == m.layers[5]
    assert m.of_tensor("token_embd.weight") == CPU
    assert m.of_tensor("output.weight") == m.of_tensor("output_norm.weight") == output


def test_describe_names_the_runs():
    assert DeviceMap.offload(4, 2, "meta").describe() == (
        "4 layers: 0-1 on cpu, 2-3 on meta; input on cpu, output on cpu"
    )


def test_negative_layer_counts_are_refused():
    with pytest.raises(InvalidRequestError, match="must be >= 0"):
        DeviceMap.offload(4, -2, "meta")
    with pytest.raises(InvalidRequestError, match="n_gpu_layers must be >= 0"):
        EngineConfig(model_path="x", n_gpu_layers=-1)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    arch = request.param
    return write_tiny_gguf(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch, "Q8_0")


def _generate(path, **kw) -> list[list[int]]:
    engine = Engine(EngineConfig(model_path=str(path), n_ctx=512, **kw))
    prompts = [[1, *range(10, 10 + n)] for n in (3, 20, 37)]
    return engine.generate(prompts, GREEDY)


@pytest.mark.parametrize("ngl", [0, 1, 3, 99])
def test_split_on_cpu_both_sides_equals_unsplit(tiny, ngl):
    assert _generate(tiny, n_gpu_layers=ngl) == _generate(tiny)


def test_layers_kv_and_head_follow_the_map(tiny):
    loaded = load_model(tiny, n_gpu_layers=2)
    model = loaded.model
    n = loaded.config.n_layers
    assert model.devices == DeviceMap.offload(n, 2, "cpu")
    engine = Engine(EngineConfig(model_path=str(tiny), n_ctx=512, n_gpu_layers=2), loaded)
    assert [k.device for k in engine.runner.cache.k] == list(model.devices.layers)


@no_cuda
def test_a_missing_accelerator_is_a_clear_error(tiny):
    with pytest.raises(InvalidRequestError, match="no CUDA device is available"):
        load_model(tiny, device="cuda", n_gpu_layers=2)
    with pytest.raises(InvalidRequestError, match="no CUDA device is available"):
        check_device("cuda:0")
    with pytest.raises(UsageError, match="-ngl/--n-gpu-layers 4: device cuda: no CUDA device"):
        parse_args(["--device", "cuda", "-ngl", "4"])


def test_ngl_0_runs_on_the_cpu_even_with_a_gpu_device(tiny):
    loaded = load_model(tiny, device="cuda", n_gpu_layers=0)
    assert loaded.model.devices.devices == {CPU}


@pytest.mark.parametrize("value, expected", [("all", None), ("auto", None), ("-1", None), ("0", 0)])
def test_ngl_spellings(value, expected):
    argv = ["-ngl", value] + (["--device", "cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available() or expected is None:
        assert parse_args(argv).n_gpu_layers == expected


def test_ngl_must_be_a_count():
    with pytest.raises(UsageError, match="expected a number of layers"):
        parse_args(["-ngl", "many"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ngl", [1, 3, 99])
def test_partial_offload_on_cuda_equals_cpu(tiny, ngl):
    """Real CUDA: hidden states cross the boundary; greedy tokens match the CPU-only model."""
    got = _generate(tiny, device="cuda", n_gpu_layers=ngl)
    assert got == _generate(tiny)
