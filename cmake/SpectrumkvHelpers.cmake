# Helper functions shared by every component.
#
# spectrumkv_cc_library(NAME <name> [ALIAS <alias>] SRCS ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...])
#   A static library with our warning flags, exported as spectrumkv::<alias or name>.
# spectrumkv_cc_test(NAME <name> SRCS ... [DEPS ...] [LABELS ...] [TIMEOUT <s>])
#   A GoogleTest binary registered with ctest.

set(SPECTRUMKV_WARNING_FLAGS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
    -Wcast-align -Wformat=2 -Wimplicit-fallthrough)
if(SPECTRUMKV_WERROR)
  list(APPEND SPECTRUMKV_WARNING_FLAGS -Werror)
endif()

# Bit-exact numerics between backends: no contraction into FMA behind our back, no fast-math.
set(SPECTRUMKV_NUMERIC_FLAGS -ffp-contract=off -fno-fast-math)

if(SPECTRUMKV_SANITIZE)
  set(SPECTRUMKV_SANITIZER_FLAGS -fsanitize=${SPECTRUMKV_SANITIZE} -fno-omit-frame-pointer
      -fno-sanitize-recover=all)
else()
  set(SPECTRUMKV_SANITIZER_FLAGS "")
endif()

function(spectrumkv_apply_flags target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${SPECTRUMKV_WARNING_FLAGS} ${SPECTRUMKV_NUMERIC_FLAGS}>
    $<$<COMPILE_LANGUAGE:CXX,C>:${SPECTRUMKV_SANITIZER_FLAGS}>)
  if(SPECTRUMKV_SANITIZER_FLAGS)
    target_link_options(${target} PRIVATE ${SPECTRUMKV_SANITIZER_FLAGS})
  endif()
endfunction()

function(spectrumkv_cc_library)
  cmake_parse_arguments(ARG "" "NAME;ALIAS" "SRCS;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${ARG_NAME} STATIC ${ARG_SRCS})
  target_include_directories(${ARG_NAME} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${ARG_NAME} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  set_target_properties(${ARG_NAME} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  spectrumkv_apply_flags(${ARG_NAME})
  if(ARG_ALIAS)
    add_library(spectrumkv::${ARG_ALIAS} ALIAS ${ARG_NAME})
  else()
    add_library(spectrumkv::${ARG_NAME} ALIAS ${ARG_NAME})
  endif()
endfunction()

function(spectrumkv_cc_binary)
  cmake_parse_arguments(ARG "" "NAME;OUTPUT_NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SRCS})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS})
  spectrumkv_apply_flags(${ARG_NAME})
  if(ARG_OUTPUT_NAME)
    set_target_properties(${ARG_NAME} PROPERTIES OUTPUT_NAME ${ARG_OUTPUT_NAME})
  endif()
  set_target_properties(${ARG_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
endfunction()

function(spectrumkv_cc_test)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SRCS})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  spectrumkv_apply_flags(${ARG_NAME})
  target_compile_definitions(${ARG_NAME} PRIVATE
    SPECTRUMKV_TESTDATA_DIR="${PROJECT_SOURCE_DIR}/tests/testdata")
  set_target_properties(${ARG_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
  add_test(NAME ${ARG_NAME} COMMAND ${ARG_NAME})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  # UCX installs its own SIGSEGV/SIGBUS handlers unless told not to; under the sanitizers they
  # would hide the sanitizers' reports (../shared/reference/anchors-ops.md).
  set_tests_properties(${ARG_NAME} PROPERTIES TIMEOUT ${ARG_TIMEOUT}
    ENVIRONMENT "SPECTRUMKV_TESTDATA=${PROJECT_SOURCE_DIR}/tests/testdata;UCX_ERROR_SIGNALS=;UCX_WARN_UNUSED_ENV_VARS=n")
  if(ARG_LABELS)
    set_tests_properties(${ARG_NAME} PROPERTIES LABELS "${ARG_LABELS}")
  endif()
endfunction()
