"""Build hook: generate the gRPC code (gguf_serve/v1/) from protos/ before setuptools collects packages.

Everything else about the package is in pyproject.toml. Generation runs here, at
the top, rather than in a build_py command, because the package list
([tool.setuptools.packages.find]) is read from the source tree when setup()
starts: the generated package has to exist by then, for wheels and for
editable installs alike. grpcio-tools and mypy-protobuf come from
[build-system] requires.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

_GEN = Path(__file__).resolve().parent / "scripts" / "gen_protos.py"


def _gen_protos() -> None:
    spec = importlib.util.spec_from_file_location("_gguf_serve_gen_protos", _GEN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.sync()


_gen_protos()
setup()
