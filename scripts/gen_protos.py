"""Generate the Python gRPC/protobuf code (and its type stubs) from protos/.

Usage: python scripts/gen_protos.py [OUT_DIR]

One part of scripts/generate, which regenerates everything generated.

OUT_DIR defaults to client/, where the generated package `lcic.guard.v1`
lives: it ships in the client's distribution (lcic-guard-client), and the
server imports it from there. The test suite runs
this into a temporary directory and fails if the committed files differ.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
PACKAGE_DIRS = ("lcic", "lcic/guard", "lcic/guard/v1")


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    well_known = str(files("grpc_tools") / "_proto")
    # The mypy plugins are installed next to this interpreter, which need
    # not be on PATH (a virtual environment run without activation).
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for pkg in PACKAGE_DIRS:
        init = out / pkg / "__init__.py"
        init.touch()
        (out / pkg / "py.typed").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client")
