"""Regenerates ``node_agent/proto_gen`` from the ``.proto`` files beside this script.

Build-time tool, outside the runtime flow: it runs ``grpc_tools.protoc`` (messages, gRPC
classes and message stubs), rewrites the generated ``import xxx_pb2`` lines into
package-relative imports so the modules load as ``node_agent.proto_gen.xxx_pb2``, and writes
typed ``xxx_pb2_grpc.pyi`` stubs for the gRPC classes (protoc writes none) so that callers are
type-checked without ``# type: ignore``. The stubs describe the grpc.aio use mpsflow makes of
the generated classes: aio channels, aio servers and ``async`` servicer methods.

It must never be imported by runtime code, and the output must never be hand-edited: change a
``.proto`` file and run ``.venv/bin/python node_agent/proto/generate.py`` from the repository root.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

PROTO_DIR = Path(__file__).resolve().parent
OUT_DIR = PROTO_DIR.parent / "proto_gen"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
PACKAGE_DOCSTRING = (
    '"""Generated protobuf and gRPC modules for the kubelet APIs mpsflow speaks.\n\n'
    "Written by node_agent/proto/generate.py from node_agent/proto/*.proto; do not edit.\n"
    '"""\n'
)
# protoc's message stubs use bare ``Mapping`` in constructor signatures, which mypy --strict
# reports as a missing type argument; nothing else in them needs silencing.
MESSAGE_STUB_HEADER = '# mypy: disable-error-code="type-arg"\n'
ABSOLUTE_PB2_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def _run_protoc(protos: list[Path], descriptor_set: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={OUT_DIR}",
            f"--grpc_python_out={OUT_DIR}",
            f"--pyi_out={OUT_DIR}",
            f"--descriptor_set_out={descriptor_set}",
            *(str(proto) for proto in protos),
        ],
        check=True,
    )


def _make_imports_relative(path: Path) -> None:
    text = path.read_text()
    path.write_text(ABSOLUTE_PB2_IMPORT.sub(r"from . import \1 as \2", text))


def _message_type(type_name: str, package: str) -> str:
    prefix = f".{package}."
    if not type_name.startswith(prefix) or "." in type_name[len(prefix) :]:
        raise SystemExit(f"stub writer supports top-level messages of the same file only, got {type_name}")
    return f"_pb2.{type_name[len(prefix) :]}"


def _grpc_stub_text(proto: descriptor_pb2.FileDescriptorProto) -> str:
    module = Path(proto.name).stem + "_pb2"
    lines = [
        f"# Typed stubs for {module}_grpc.py, written by node_agent/proto/generate.py; do not edit.",
        "from collections.abc import AsyncIterator",
        "",
        "import grpc.aio",
        "",
        f"from . import {module} as _pb2",
    ]
    for service in proto.service:
        stub_fields: list[str] = []
        servicer_methods: list[str] = []
        for method in service.method:
            if method.client_streaming:
                raise SystemExit(
                    f"stub writer does not support client streaming ({service.name}.{method.name})"
                )
            request = _message_type(method.input_type, proto.package)
            response = _message_type(method.output_type, proto.package)
            context = f"grpc.aio.ServicerContext[{request}, {response}]"
            if method.server_streaming:
                stub_fields.append(
                    f"    {method.name}: grpc.aio.UnaryStreamMultiCallable[{request}, {response}]"
                )
                servicer_methods.append(
                    f"    def {method.name}(self, request: {request}, context: {context})"
                    f" -> AsyncIterator[{response}]: ..."
                )
            else:
                stub_fields.append(
                    f"    {method.name}: grpc.aio.UnaryUnaryMultiCallable[{request}, {response}]"
                )
                servicer_methods.append(
                    f"    async def {method.name}(self, request: {request}, context: {context})"
                    f" -> {response}: ..."
                )
        lines += [
            "",
            f"class {service.name}Stub:",
            *stub_fields,
            "    def __init__(self, channel: grpc.aio.Channel) -> None: ...",
            "",
            f"class {service.name}Servicer:",
            *servicer_methods,
            "",
            f"def add_{service.name}Servicer_to_server(servicer: {service.name}Servicer, "
            "server: grpc.aio.Server) -> None: ...",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    OUT_DIR.mkdir(exist_ok=True)
    for stale in OUT_DIR.iterdir():
        if stale.name.endswith(GENERATED_SUFFIXES):
            stale.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        descriptor_set_path = Path(scratch) / "descriptors.pb"
        _run_protoc(protos, descriptor_set_path)
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path.read_bytes())
    for generated in OUT_DIR.iterdir():
        if generated.name.endswith(GENERATED_SUFFIXES):
            _make_imports_relative(generated)
    for message_stub in OUT_DIR.glob("*_pb2.pyi"):
        message_stub.write_text(MESSAGE_STUB_HEADER + message_stub.read_text())
    for proto in descriptor_set.file:
        stub_path = OUT_DIR / (Path(proto.name).stem + "_pb2_grpc.pyi")
        stub_path.write_text(_grpc_stub_text(proto))
    (OUT_DIR / "__init__.py").write_text(PACKAGE_DOCSTRING)


if __name__ == "__main__":
    main()
