"""The committed generated code matches the .proto, and the .proto documents
every element of the contract."""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Iterator
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client"
PROTO_ROOT = REPO / "protos"
REGENERATE = "regenerate it with: scripts/generate"


def _gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("generated")
    _gen_protos().generate(out)
    return _tree(out / "lcic")


def test_committed_generated_code_is_current(generated: dict[str, bytes]) -> None:
    committed = _tree(CLIENT / "lcic")
    assert generated, "the generator produced nothing"
    assert any(name.endswith("_pb2.py") for name in generated)
    assert any(name.endswith("_pb2_grpc.pyi") for name in generated)
    missing = sorted(set(generated) - set(committed))
    assert not missing, f"generated files not committed under client/lcic: {missing}; {REGENERATE}"
    stale = sorted(n for n in generated if committed[n] != generated[n])
    assert not stale, f"committed generated files differ from the .proto: {stale}; {REGENERATE}"
    extra = sorted(set(committed) - set(generated))
    assert not extra, (
        f"files under client/lcic the generator does not produce: {extra}; "
        f"remove them and {REGENERATE}"
    )


def test_generator_versions_are_the_pinned_ones() -> None:
    # The comparison above is only meaningful with the pinned generators.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {
        req.split("==")[0]: req.split("==")[1]
        for req in pyproject["project"]["optional-dependencies"]["dev"]
        if "==" in req
    }
    for tool in ("grpcio-tools", "mypy-protobuf"):
        assert tool in pins, f"{tool} must be pinned exactly in the dev extras"
        assert metadata.version(tool) == pins[tool], (
            f"{tool} {metadata.version(tool)} is installed but {pins[tool]} is pinned; "
            "run scripts/bootstrap"
        )


# -- every element of the contract has a leading comment ------------------------------------

# Field numbers in descriptor.proto, the steps of SourceCodeInfo paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

Element = tuple[str, tuple[int, ...]]


def descriptor_set(
    out: Path, proto_root: Path, protos: list[str]
) -> descriptor_pb2.FileDescriptorSet:
    target = out / "descriptors.pb"
    well_known = str(files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        "--include_source_info",
        f"--descriptor_set_out={target}",
        *protos,
    ]
    assert protoc.main(args) == 0, "protoc failed"
    return descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())


def _message_elements(
    msg: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]
) -> Iterator[Element]:
    yield f"message {name}", path
    for i, f in enumerate(msg.field):
        yield f"field {name}.{f.name}", (*path, MESSAGE_FIELD, i)
    for i, o in enumerate(msg.oneof_decl):
        yield f"oneof {name}.{o.name}", (*path, MESSAGE_ONEOF, i)
    for i, nested in enumerate(msg.nested_type):
        if nested.options.map_entry:
            continue  # synthesized for map<,> fields; documented by the field
        yield from _message_elements(nested, f"{name}.{nested.name}", (*path, MESSAGE_NESTED, i))
    for i, enum in enumerate(msg.enum_type):
        yield from _enum_elements(enum, f"{name}.{enum.name}", (*path, MESSAGE_ENUM, i))


def _enum_elements(
    enum: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]
) -> Iterator[Element]:
    yield f"enum {name}", path
    for i, v in enumerate(enum.value):
        yield f"enum value {name}.{v.name}", (*path, ENUM_VALUE, i)


def elements(fd: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    """Every service, rpc, message, field, oneof, enum and enum value."""
    for i, svc in enumerate(fd.service):
        yield f"service {svc.name}", (FILE_SERVICE, i)
        for j, m in enumerate(svc.method):
            yield f"rpc {svc.name}.{m.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)
    for i, msg in enumerate(fd.message_type):
        yield from _message_elements(msg, msg.name, (FILE_MESSAGE, i))
    for i, enum in enumerate(fd.enum_type):
        yield from _enum_elements(enum, enum.name, (FILE_ENUM, i))


def undocumented(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    out = []
    for fd in fds.file:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location
        }
        for what, path in elements(fd):
            if not comments.get(path):
                out.append(f"{fd.name}: {what}")
    return out


def test_every_element_of_the_proto_has_a_leading_comment(tmp_path: Path) -> None:
    protos = _gen_protos().PROTOS
    assert "lcic/guard/v1/enforcement.proto" in protos
    fds = descriptor_set(tmp_path, PROTO_ROOT, protos)
    assert {fd.name for fd in fds.file} == set(protos)
    counted = [e for fd in fds.file for e in elements(fd)]
    kinds = {what.split(" ")[0] for what, _ in counted}
    assert {"service", "rpc", "message", "field", "enum", "oneof"} <= kinds
    assert len(counted) > 100  # the walk really visits the contract
    missing = undocumented(fds)
    assert not missing, "elements without a leading // comment:\n  " + "\n  ".join(missing)


def test_the_comment_check_finds_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "protos"
    root.mkdir()
    (root / "probe.proto").write_text(
        """syntax = "proto3";
package probe.v1;

// Documented.
service Probe {
  rpc Undocumented(Req) returns (Req);
}

// Documented.
message Req {
  // Documented.
  string a = 1;
  string b = 2;
  oneof kind {
    // Documented.
    string c = 3;
  }
  // Documented.
  message Inner {
    int32 x = 1;
  }
}

enum Color {
  // Documented.
  COLOR_UNSPECIFIED = 0;
  COLOR_RED = 1; // a trailing comment is not a leading one
}
"""
    )
    fds = descriptor_set(tmp_path, root, ["probe.proto"])
    assert sorted(undocumented(fds)) == sorted(
        [
            "probe.proto: rpc Probe.Undocumented",
            "probe.proto: field Req.b",
            "probe.proto: oneof Req.kind",
            "probe.proto: field Req.Inner.x",
            "probe.proto: enum Color",
            "probe.proto: enum value Color.COLOR_RED",
        ]
    )
