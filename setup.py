"""Generate the gRPC stubs from proto/*.proto at build time, where setuptools packages them.

The stubs are never committed or edited (csi_virtvol/csi/_gen/ is in .gitignore); protoc
from grpcio-tools (a build requirement) writes them:

- wheel (`pip install .`, `pip wheel`, `python -m build`): into the build directory, after
  build_py has copied the sources, so they are in the wheel whether or not the source tree
  has them (a fresh clone has not, and setuptools has listed the packages before any
  command runs);
- editable install (`./dev setup`): into the source tree, which the editable install maps;
- sdist: into the release tree, next to proto/ (MANIFEST.in), so the sdist carries the
  stubs and a wheel built from it regenerates the same files.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = ("csi", "virtvol")
GEN_DIR = os.path.join("csi_virtvol", "csi", "_gen")
STUBS = ("__init__.py",) + tuple(f"{p}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def generate_stubs(out: str) -> list[str]:
    """protoc into a scratch directory, then move each stub into `out`, replacing what is
    there (an sdist's release tree hard-links the source files: never write through them).
    Returns the paths written."""
    from grpc_tools import protoc  # build requirement
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory(prefix="virtvol-stubs-") as tmp:
        for proto in PROTOS:
            args = ["protoc", f"-I{os.path.join(HERE, 'proto')}", f"-I{include}",
                    f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", f"{proto}.proto"]
            if protoc.main(args) != 0:
                sys.exit(f"protoc failed on proto/{proto}.proto")
            grpc_file = os.path.join(tmp, f"{proto}_pb2_grpc.py")
            with open(grpc_file) as fh:
                text = fh.read()
            # protoc writes an absolute import; the stubs live inside our package
            text = re.sub(rf"^import {proto}_pb2 as {proto}__pb2$", f"from . import {proto}_pb2 as {proto}__pb2",
                          text, flags=re.M)
            with open(grpc_file, "w") as fh:
                fh.write(text)
        with open(os.path.join(tmp, "__init__.py"), "w") as fh:
            fh.write('"""Generated from proto/*.proto at build time; never edit."""\n')
        made = sorted(os.listdir(tmp))
        if made != sorted(STUBS):
            sys.exit(f"protoc wrote {made}, expected {sorted(STUBS)}")
        os.makedirs(out, exist_ok=True)
        written = []
        for name in STUBS:
            dest = os.path.join(out, name)
            if os.path.lexists(dest):
                os.unlink(dest)
            shutil.move(os.path.join(tmp, name), dest)
            written.append(dest)
    return written


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        if self.editable_mode:
            generate_stubs(os.path.join(HERE, GEN_DIR))
            super().run()
        else:
            super().run()
            generate_stubs(os.path.join(self.build_lib, GEN_DIR))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs += [os.path.join(self.build_lib, GEN_DIR, name) for name in STUBS
                        if os.path.join(self.build_lib, GEN_DIR, name) not in outputs]
        return outputs


class SdistWithStubs(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        generate_stubs(os.path.join(base_dir, GEN_DIR))


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithStubs})
