# TORCH_CUDA_ARCH_LIST -> the CUDA arch lists of the build. Entries look like 8.0, 9.0a or 8.6+PTX and
# are separated by ';' or spaces (torch documents both forms). Without any "+PTX", the newest arch also
# ships PTX: GPUs newer than every arch built (sm_100, sm_120, ...) then JIT-compile it instead of
# finding no kernel image. fastkd/_cuda_archs.py reads the resulting list back from build_info().
#
#   fastkd_cuda_arch_list(<text> <torch_out> <cmake_out> <error_out>)
#     <torch_out>  ';'-separated, "+PTX" marked: the TORCH_CUDA_ARCH_LIST torch's CMake config reads
#     <cmake_out>  the CMAKE_CUDA_ARCHITECTURES form ("80-real;90": "-real" is machine code only)
#     <error_out>  empty, or why <text> is not an arch list (the other outputs are then empty)
#
# Script mode prints the three (tests/test_cuda_archs.py):
#   cmake -DFASTKD_ARCH_LIST="8.0 9.0" -P cmake/FastkdCudaArchs.cmake

function(fastkd_cuda_arch_list text torch_out cmake_out error_out)
  set(${torch_out} "" PARENT_SCOPE)
  set(${cmake_out} "" PARENT_SCOPE)
  string(REGEX REPLACE "[ \t\r\n;]+" ";" entries "${text}")
  string(REGEX REPLACE "^;|;$" "" entries "${entries}")
  if(NOT entries)
    set(${error_out} "TORCH_CUDA_ARCH_LIST='${text}' names no CUDA arch" PARENT_SCOPE)
    return()
  endif()
  list(REMOVE_DUPLICATES entries)

  set(newest "")
  set(newest_number -1)
  set(has_ptx FALSE)
  foreach(entry IN LISTS entries)
    if(NOT entry MATCHES "^([0-9]+)\\.([0-9])([af]?)(\\+PTX)?$")
      set(${error_out} "TORCH_CUDA_ARCH_LIST='${text}': bad entry '${entry}'; expected entries like 8.0, 9.0a or 8.6+PTX, separated by ';' or spaces" PARENT_SCOPE)
      return()
    endif()
    if(CMAKE_MATCH_4)
      set(has_ptx TRUE)
    endif()
    math(EXPR number "${CMAKE_MATCH_1} * 10 + ${CMAKE_MATCH_2}")
    if(number GREATER newest_number)
      set(newest "${entry}")
      set(newest_number ${number})
    endif()
  endforeach()
  if(NOT has_ptx)
    list(FIND entries "${newest}" at)
    list(REMOVE_AT entries ${at})
    list(INSERT entries ${at} "${newest}+PTX")
  endif()

  # "8.6+PTX" -> "86" (machine code and PTX), "9.0a" -> "90a-real" (machine code only)
  set(cmake_archs "")
  foreach(entry IN LISTS entries)
    string(REPLACE "+PTX" "" arch "${entry}")
    string(REPLACE "." "" arch "${arch}")
    if(entry MATCHES "\\+PTX$")
      list(APPEND cmake_archs "${arch}")
    else()
      list(APPEND cmake_archs "${arch}-real")
    endif()
  endforeach()
  set(${torch_out} "${entries}" PARENT_SCOPE)
  set(${cmake_out} "${cmake_archs}" PARENT_SCOPE)
  set(${error_out} "" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  fastkd_cuda_arch_list("${FASTKD_ARCH_LIST}" _torch _cmake _error)
  message(STATUS "torch: ${_torch}")
  message(STATUS "cmake: ${_cmake}")
  message(STATUS "error: ${_error}")
endif()
