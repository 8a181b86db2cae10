# SPDX-License-Identifier: Apache-2.0
"""Checks the package `conan create` made: a CUDA program that finds moe with
find_package(moe CONFIG REQUIRED), links moe::moe, and needs no GPU to run."""

import os

from conan import ConanFile
from conan.tools.build import can_run
from conan.tools.cmake import CMake, cmake_layout


class MoeTestConan(ConanFile):
    settings = "os", "arch", "compiler", "build_type"
    generators = "CMakeToolchain"

    def requirements(self):
        self.requires(self.tested_reference_str)

    def layout(self):
        cmake_layout(self)

    def build(self):
        cmake = CMake(self)
        # The program checks that the headers are those of the version Conan packaged.
        version = str(self.dependencies["moe"].ref.version)
        cmake.configure(variables={"MOE_EXPECTED_VERSION": version})
        cmake.build()

    def test(self):
        if can_run(self):
            self.run(os.path.join(self.cpp.build.bindir, "test_package"), env="conanrun")
