"""Build hook: generate the gRPC/protobuf Python modules from proto/ before packaging.

The generated modules are never committed or edited (DESIGN section 2, proto/); they are
written into hybridiff/api/v1/ together with a stamp of the .proto sources so that a stale
generation is detected at import time (hybridiff/api/__init__.py).
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        from hybridiff.api.generate import generate

        generate()
        # The generated package did not exist when setuptools listed the packages.
        if self.packages is not None and "hybridiff.api.v1" not in self.packages:
            self.packages.append("hybridiff.api.v1")
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
