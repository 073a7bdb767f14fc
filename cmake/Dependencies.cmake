# Every find_package call of the project, in one place. All come from Debian 12 packages
# (scripts/setup.sh installs them); see ../shared/reference/anchors-ops.md for version traps.
find_package(Threads REQUIRED)
find_package(absl CONFIG REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
find_package(PkgConfig REQUIRED)
# ISA-L provides CRC32C (crc32_iscsi); there is no libcrc32c in bookworm and absl/crc is newer.
pkg_check_modules(ISAL REQUIRED IMPORTED_TARGET libisal)

if(SPECTRUMKV_BUILD_TESTS)
  find_package(GTest CONFIG REQUIRED)
endif()

# The daemon: gRPC/protobuf (module-mode Protobuf: Debian ships no protobuf-config.cmake),
# yaml-cpp (target `yaml-cpp`), prometheus-cpp (no version: its package has no version file),
# spdlog.
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)
find_package(yaml-cpp CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
# UCX 1.13 (Debian: no CUDA transports); only daemon/transport/ucx includes its headers.
find_package(ucx CONFIG REQUIRED)
