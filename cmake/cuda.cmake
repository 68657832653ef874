# CUDA is optional. JMP_EXT_CUDA (cache variable, or the environment variable of the same name
# through pyproject.toml) selects:
#   AUTO (default)  build the CUDA kernels when a CUDA compiler is found (nvcc on PATH, CUDACXX,
#                   or $CUDA_HOME/bin/nvcc),
#   ON              require them (configuration fails without nvcc),
#   OFF             CPU kernels only.
# CMAKE_CUDA_ARCHITECTURES (or the CUDAARCHS environment variable) overrides the default list.
set(JMP_EXT_CUDA "AUTO" CACHE STRING "Build CUDA kernels: AUTO, ON or OFF")
string(TOUPPER "${JMP_EXT_CUDA}" _jmp_cuda)

if(NOT DEFINED ENV{CUDACXX} AND DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
  set(CMAKE_CUDA_COMPILER "$ENV{CUDA_HOME}/bin/nvcc")
endif()

set(JMP_EXT_WITH_CUDA OFF)
if(_jmp_cuda STREQUAL "ON" OR _jmp_cuda STREQUAL "1" OR _jmp_cuda STREQUAL "TRUE")
  set(JMP_EXT_WITH_CUDA ON)
elseif(_jmp_cuda STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(JMP_EXT_WITH_CUDA ON)
  else()
    message(STATUS "jmp_ext: no CUDA compiler found, building CPU kernels only")
  endif()
elseif(NOT (_jmp_cuda STREQUAL "OFF" OR _jmp_cuda STREQUAL "0" OR _jmp_cuda STREQUAL "FALSE"))
  message(FATAL_ERROR "JMP_EXT_CUDA must be AUTO, ON or OFF, got '${JMP_EXT_CUDA}'")
endif()

if(JMP_EXT_WITH_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    # A100 and H100 as native code, plus PTX of sm_90 that newer GPUs JIT-compile.
    set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  message(STATUS "jmp_ext: building CUDA kernels for ${CMAKE_CUDA_ARCHITECTURES}")
endif()
