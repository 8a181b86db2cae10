# SPDX-License-Identifier: Apache-2.0
#
# moe is header-only: one release configuration, no debug tree.
set(VCPKG_BUILD_TYPE release)

# This port lives in moe's repository and builds the tree it belongs to, as an overlay port:
#   vcpkg install moe --overlay-ports=<moe>/ports
# (a port in a registry would fetch a release instead, with vcpkg_from_github and REF
# "v${VERSION}"). The version in vcpkg.json equals project(moe VERSION) in CMakeLists.txt; the
# consumer.vcpkg_port test checks that.
cmake_path(SET SOURCE_PATH NORMALIZE "${CMAKE_CURRENT_LIST_DIR}/../..")

# CUDA, CCCL (part of the CUDA toolkit) and NCCL come from the system; vcpkg's cuda and nccl
# ports only check that they are there. With the nccl feature, moe's own configure must find
# NCCL too, with the FindNCCL module its package installs, so that a consumer's
# find_package(moe COMPONENTS nccl) cannot fail where the installation succeeded.
vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    nccl CMAKE_REQUIRE_FIND_PACKAGE_NCCL
)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    ${FEATURE_OPTIONS}
    -DMOE_BUILD_TESTS=OFF
    -DMOE_BUILD_EXAMPLES=OFF
    -DMOE_BUILD_BENCHMARKS=OFF
    -DMOE_INSTALL=ON
    # vcpkg's place for a package's CMake files, so that the fixup below moves nothing.
    -DMOE_INSTALL_CMAKEDIR=share/moe
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup()

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
