#!/usr/bin/env python3
"""Generates the gRPC Python code (gguf_serve/v1/*_pb2*.py and typed .pyi stubs) from protos/.

The generated package sits at the repository root as `gguf_serve.v1`: protoc's
generated imports follow the proto path (`from gguf_serve.v1 import sampling_pb2`),
so the Python package must be named like the proto package. It is gitignored,
built by `pip install` (setup.py calls `sync()`), and never edited by hand.

    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --check    # exit 1 when the generated code is stale

Needs grpcio-tools (protoc + the gRPC plugin) and mypy-protobuf (the .pyi plugins),
at the versions pinned in pyproject.toml, so the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "gguf_serve"  # the generated top-level package, named after the proto package
_INIT = {
    PACKAGE: '"""Generated from protos/ by scripts/gen_protos.py (grpcio-tools); do not edit."""\n',
    f"{PACKAGE}/v1": '"""gguf_serve.v1: messages (*_pb2) and gRPC stubs (*_pb2_grpc), generated; do not edit."""\n',
}


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(proto_root.rglob("*.proto"))


def _plugin(name: str) -> str:
    """The path of a protoc plugin installed by mypy-protobuf (on PATH, or beside this Python)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"gen_protos: {name} not found: pip install mypy-protobuf")
    return found


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the generated package under out_dir; returns the files written, relative to out_dir."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise SystemExit("gen_protos: grpcio-tools is needed to generate the gRPC code") from e
    files = proto_files(proto_root)
    if not files:
        raise SystemExit(f"gen_protos: no .proto files under {proto_root}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(f.relative_to(proto_root)) for f in files),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("gen_protos: protoc failed (see above)")
    for pkg, text in _INIT.items():
        (out_dir / pkg / "__init__.py").write_text(text)
    (out_dir / PACKAGE / "py.typed").write_text("")  # PEP 561: type checkers use the .pyi stubs
    return sorted(p.relative_to(out_dir) for p in (out_dir / PACKAGE).rglob("*") if p.is_file())


def sync(dest_root: Path = ROOT, proto_root: Path = PROTO_ROOT) -> bool:
    """Regenerate into dest_root/gguf_serve, touching only files that changed; True if any did."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        changed = False
        for rel in fresh:
            src, dst = Path(tmp) / rel, dest_root / rel
            if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                changed = True
        keep = set(fresh)
        for old in (dest_root / PACKAGE).rglob("*"):  # outputs of a deleted .proto
            rel = old.relative_to(dest_root)
            if old.is_file() and rel not in keep and "__pycache__" not in rel.parts:
                old.unlink()
                changed = True
    return changed


def stale(dest_root: Path = ROOT, proto_root: Path = PROTO_ROOT) -> list[str]:
    """The generated files that differ from what the protos give now (missing ones included)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        return [
            str(rel)
            for rel in fresh
            if not (dest_root / rel).exists()
            or not filecmp.cmp(Path(tmp) / rel, dest_root / rel, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--check", action="store_true", help="only report whether the generated code is stale"
    )
    args = p.parse_args(argv)
    if args.check:
        bad = stale()
        for rel in bad:
            print(f"stale: {rel}", file=sys.stderr)
        return 1 if bad else 0
    changed = sync()
    print(f"gen_protos: {PACKAGE}/ {'updated' if changed else 'up to date'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
