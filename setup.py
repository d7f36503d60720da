"""Build steps only: the Cython extension and the protobuf/gRPC code generated from protos/.

Everything else lives in pyproject.toml. ``KVSTORE_DEBUG=1`` builds the extension
with bounds checks on and no optimisation; ``KVSTORE_ANNOTATE=1`` writes Cython's
HTML annotation next to the sources.
"""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Command, Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
DEBUG = os.environ.get("KVSTORE_DEBUG") == "1"


def generate_protos() -> None:
    """Generate kvstore/v1/*_pb2*.py(i) from protos/kvstore/v1/*.proto when out of date."""
    import grpc_tools
    from grpc_tools import protoc  # a build requirement, imported only when generating

    protos = sorted((ROOT / "protos" / "kvstore" / "v1").glob("*.proto"))
    for proto in protos:
        out = ROOT / "kvstore" / "v1" / (proto.stem + "_pb2.py")
        if out.exists() and out.stat().st_mtime >= proto.stat().st_mtime:
            continue
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{well_known}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class GenerateProtos(Command):
    """``python setup.py generate_protos``: only the protobuf step."""

    description = "generate protobuf and gRPC code from protos/"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_protos()


class BuildPy(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


extensions = [
    Extension(
        "kvstore._codec",
        # codec.pyx includes ext/*.pxi and cimports ext/codec.pxd; cythonize tracks both,
        # so a change to any of them regenerates the C (and make build recompiles it).
        ["ext/codec.pyx"],
        include_dirs=[
            str(ROOT / "ext"),
            str(ROOT / "ext" / "vendor" / "xxhash"),
            numpy.get_include(),  # the codec makes its result arrays with NumPy's C API
        ],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=os.environ.get("KVSTORE_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": DEBUG,
            "embedsignature": True,
        },
    ),
    cmdclass={"build_py": BuildPy, "generate_protos": GenerateProtos},
)
