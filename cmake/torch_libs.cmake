# Finds libtorch through the Python environment that holds torch, without torch's own CMake
# config (which insists on a CUDA toolkit for CUDA builds of torch; nothing here needs one).
# Defines: TORCH_DIR, TORCH_VERSION, TORCH_CXX11_ABI and the imported target torch_libs.
find_package(Python COMPONENTS Interpreter REQUIRED)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__.split('+')[0])"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "torch is not importable by ${Python_EXECUTABLE}")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_DIR)
list(GET _torch_info 1 TORCH_CXX11_ABI)
list(GET _torch_info 2 TORCH_VERSION)
message(STATUS "torch ${TORCH_VERSION} at ${TORCH_DIR} (CXX11 ABI ${TORCH_CXX11_ABI})")

find_library(TORCH_LIB torch PATHS "${TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
find_library(TORCH_CPU_LIB torch_cpu PATHS "${TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
find_library(C10_LIB c10 PATHS "${TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)

add_library(torch_libs INTERFACE)
target_include_directories(torch_libs SYSTEM INTERFACE
  "${TORCH_DIR}/include" "${TORCH_DIR}/include/torch/csrc/api/include")
target_compile_definitions(torch_libs INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})
target_link_libraries(torch_libs INTERFACE ${TORCH_LIB} ${TORCH_CPU_LIB} ${C10_LIB})
