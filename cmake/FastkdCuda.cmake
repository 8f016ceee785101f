# Decides whether the CUDA kernels are built (FASTKD_CUDA=auto|on|off) and prepares torch's CMake
# config for it. Sets FASTKD_WITH_CUDA (0/1), FASTKD_CUDA_SOURCES, FASTKD_CUDA_ARCHS_STRING and the
# function fastkd_configure_cuda_target().
set(FASTKD_CUDA "auto" CACHE STRING "Build the CUDA kernels: auto, on or off")
if(DEFINED ENV{FASTKD_CUDA} AND NOT "$ENV{FASTKD_CUDA}" STREQUAL "")
  set(FASTKD_CUDA "$ENV{FASTKD_CUDA}")
endif()
string(TOLOWER "${FASTKD_CUDA}" FASTKD_CUDA)

# torch's CMake config sets CUDA up whenever torch itself was built with CUDA. On a machine without a
# GPU its default arch list includes compute_50, which nvcc 13 rejects: give it a sensible default.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} OR "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
endif()
include("${CMAKE_CURRENT_LIST_DIR}/FastkdCudaArchs.cmake")
fastkd_cuda_arch_list("$ENV{TORCH_CUDA_ARCH_LIST}" FASTKD_CUDA_ARCHS_LIST FASTKD_CUDA_CMAKE_ARCHS
                      FASTKD_CUDA_ARCHS_ERROR)
# A list this file cannot read (torch also takes names such as "Hopper") is an error only when the
# kernels are built (below); otherwise torch's config gets it as it was.
if(NOT FASTKD_CUDA_ARCHS_ERROR)
  set(ENV{TORCH_CUDA_ARCH_LIST} "${FASTKD_CUDA_ARCHS_LIST}")
endif()
string(REPLACE ";" " " FASTKD_CUDA_ARCHS_STRING "${FASTKD_CUDA_ARCHS_LIST}")  # for a compile definition

# torch's pip wheel depends on the nvidia-* wheels; point CMake at their nvrtc (the system toolkit
# may not ship the same major version).
if(NOT CUDA_nvrtc_LIBRARY)
  file(GLOB _fastkd_nvrtc
       "${FASTKD_TORCH_PREFIX}/../../../nvidia/cu*/lib/libnvrtc.so*"
       "${FASTKD_TORCH_PREFIX}/../../../nvidia/cuda_nvrtc/lib/libnvrtc.so*")
  list(FILTER _fastkd_nvrtc EXCLUDE REGEX "builtins|alt")
  if(_fastkd_nvrtc)
    list(GET _fastkd_nvrtc 0 _fastkd_nvrtc0)
    set(CUDA_nvrtc_LIBRARY "${_fastkd_nvrtc0}" CACHE FILEPATH "nvrtc library")
  endif()
endif()

set(FASTKD_WITH_CUDA 0)
set(FASTKD_CUDA_SOURCES "")
# Even without fastkd's CUDA kernels, torch's CMake config looks for the toolkit of a CUDA torch.
if(NOT EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/include/cuda_runtime.h")
  foreach(_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" "/usr/local/cuda")
    if(_root AND EXISTS "${_root}/include/cuda_runtime.h")
      set(CUDA_TOOLKIT_ROOT_DIR "${_root}" CACHE PATH "CUDA toolkit" FORCE)
      set(CUDAToolkit_ROOT "${_root}")
      break()
    endif()
  endforeach()
endif()
if(NOT FASTKD_CUDA STREQUAL "off" AND NOT FASTKD_TORCH_CUDA STREQUAL "")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(FASTKD_WITH_CUDA 1)
  endif()
endif()
if(FASTKD_CUDA STREQUAL "on" AND NOT FASTKD_WITH_CUDA)
  message(FATAL_ERROR "FASTKD_CUDA=on but torch has no CUDA (torch.version.cuda='${FASTKD_TORCH_CUDA}') or nvcc was not found")
endif()

if(FASTKD_WITH_CUDA)
  if(FASTKD_CUDA_ARCHS_ERROR)
    message(FATAL_ERROR "${FASTKD_CUDA_ARCHS_ERROR}")
  endif()
  set(CMAKE_CUDA_ARCHITECTURES "${FASTKD_CUDA_CMAKE_ARCHS}")
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  # Kernels in .cu; the ATen glue in .cpp (host compiler only: the torch headers compile faster there).
  file(GLOB FASTKD_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu"
       "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp")
  message(STATUS "fastkd: building CUDA kernels for ${CMAKE_CUDA_ARCHITECTURES}")
  # nvcc may be a wrapper script outside the toolkit; tell torch's FindCUDA where the toolkit is.
  if(EXISTS "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}/include/cuda_runtime.h")
    set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit" FORCE)
    set(CUDAToolkit_ROOT "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
  endif()
else()
  message(STATUS "fastkd: CUDA kernels not built (FASTKD_CUDA=${FASTKD_CUDA}, torch CUDA='${FASTKD_TORCH_CUDA}')")
endif()

function(fastkd_configure_cuda_target target)
  if(FASTKD_WITH_CUDA)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo --expt-relaxed-constexpr>)
    # The device build gets its own copy of distill_row.h's inline functions (see FASTKD_ISA there).
    target_compile_definitions(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:FASTKD_ISA=gpu>)
    set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
  endif()
endfunction()
