"""Build hook: generate the gRPC/protobuf Python modules from proto/ before packaging.

The generated modules are never committed or edited (docs/design.md section 2, proto/); they are
written into hybridiff/v1/ and hybridiff/internal/v1/ with a digest of the .proto sources, so
that a stale generation is detected (hybridiff.codegen.assert_fresh).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GENERATED = ("hybridiff.v1", "hybridiff.internal", "hybridiff.internal.v1")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        from hybridiff.codegen import generate

        generate()
        # The generated packages did not exist when setuptools listed the packages.
        if self.packages is not None:
            self.packages.extend(p for p in GENERATED if p not in self.packages)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
