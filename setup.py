"""Build hook: generate the gRPC/protobuf Python modules from proto/ before packaging.

The generated modules are never committed or edited (docs/design.md section 2, proto/); they are
written into hybridiff/v1/ and hybridiff/internal/v1/ with a digest of the .proto sources, so
that a stale generation is detected (hybridiff.codegen.assert_fresh).

The trained default model (models/shapes-sdxl, committed next to the packages) goes into the
built packages as hybridiff/models/shapes-sdxl, so that an installed server (a wheel, the
container image) serves it; hybridiff_launch.model_dirs finds it there when there is no repository.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GENERATED = ("hybridiff.v1", "hybridiff.internal", "hybridiff.internal.v1")
ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join("models", "shapes-sdxl")  # in the repository, and under hybridiff/ when built


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        from hybridiff.codegen import generate

        generate()
        # The generated packages did not exist when setuptools listed the packages.
        if self.packages is not None:
            self.packages.extend(p for p in GENERATED if p not in self.packages)
        super().run()
        source = os.path.join(ROOT, DEFAULT_MODEL)
        # An editable install reads the repository's copy; a source tree without it builds none.
        if not getattr(self, "editable_mode", False) and os.path.isfile(
            os.path.join(source, "model_index.json")
        ):
            target = os.path.join(self.build_lib, "hybridiff", DEFAULT_MODEL)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)


setup(cmdclass={"build_py": BuildPyWithProtos})
