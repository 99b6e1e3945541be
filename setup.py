"""Generate the CSI gRPC stubs from proto/csi.proto at build time.

The stubs are never committed or edited: every `pip install` (editable or
not) runs protoc from grpcio-tools and writes them to csi_virtvol/csi/_gen/.
"""
from __future__ import annotations

import os
import re
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement
    import grpc_tools

    out = os.path.join(HERE, "csi_virtvol", "csi", "_gen")
    os.makedirs(out, exist_ok=True)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for proto in ("csi", "virtvol"):
        args = ["protoc", f"-I{os.path.join(HERE, 'proto')}", f"-I{include}",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", f"{proto}.proto"]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed on proto/{proto}.proto")
        grpc_file = os.path.join(out, f"{proto}_pb2_grpc.py")
        with open(grpc_file) as fh:
            text = fh.read()
        # protoc writes an absolute import; the stubs live inside our package
        text = re.sub(rf"^import {proto}_pb2 as {proto}__pb2$", f"from . import {proto}_pb2 as {proto}__pb2",
                      text, flags=re.M)
        with open(grpc_file, "w") as fh:
            fh.write(text)
    with open(os.path.join(out, "__init__.py"), "w") as fh:
        fh.write('"""Generated from proto/csi.proto at build time; never edit."""\n')


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
