"""The generated gRPC code (gguf_serve/v1/) is exactly what protos/ gives, and the proto mirrors SamplingParams."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from google.protobuf import descriptor_pb2

import gguf_serve.v1 as generated
from gguf_serve.v1 import inference_pb2, sampling_pb2
from runtime.sampling_params import SamplingParams
from scripts import gen_protos


def test_generated_code_matches_the_protos(tmp_path):
    installed = Path(generated.__file__).parent.parent.parent  # the directory holding gguf_serve/
    fresh = gen_protos.generate(tmp_path)
    assert {p.name for p in fresh} >= {
        "inference_pb2.py",
        "inference_pb2_grpc.py",
        "inference_pb2.pyi",
        "sampling_pb2.pyi",
    }
    stale = [
        str(rel) for rel in fresh if (tmp_path / rel).read_bytes() != (installed / rel).read_bytes()
    ]
    assert not stale, (
        f"generated code is stale (run scripts/gen_protos.py or pip install -e .): {stale}"
    )
    extra = {p.relative_to(installed) for p in (installed / "gguf_serve").rglob("*") if p.is_file()}
    extra = {p for p in extra if "__pycache__" not in p.parts} - set(fresh)
    assert not extra, f"generated files without a .proto: {sorted(map(str, extra))}"


def test_loaded_descriptors_are_the_proto_files():
    # What reflection serves is what the modules registered: the same FileDescriptorProto as protoc's.
    for module, name in (
        (inference_pb2, "gguf_serve/v1/inference.proto"),
        (sampling_pb2, "gguf_serve/v1/sampling.proto"),
    ):
        fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        assert fd.name == name and fd.package == "gguf_serve.v1"


def test_sampling_params_message_mirrors_the_runtime():
    proto = set(sampling_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    runtime = {f.name for f in dataclasses.fields(SamplingParams)}
    # penalty_prompt (text or ids) becomes penalty_prompt_tokens.
    assert runtime - proto == {"penalty_prompt_tokens"}
    assert proto - runtime == {"penalty_prompt"}
    for f in sampling_pb2.SamplingParams.DESCRIPTOR.fields:
        if not f.is_repeated and f.message_type is None:
            assert f.has_presence, f"{f.name}: unset must differ from zero (proto3 optional)"
