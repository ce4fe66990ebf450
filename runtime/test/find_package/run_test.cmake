#===- run_test.cmake - the l4rt_find_package ctest ------------------------===#
# Writes the test plans, configures and builds the outside project against
# the build tree's l4rt package, runs both consumers and checks their output.
# Inputs: SOURCE_DIR BINARY_DIR L4RT_DIR PLAN_WRITER GENERATOR C_COMPILER
# CXX_COMPILER.
file(REMOVE_RECURSE ${BINARY_DIR})
file(MAKE_DIRECTORY ${BINARY_DIR}/plans)

function(run_checked)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
  set(OUT "${out}" PARENT_SCOPE)
endfunction()

run_checked(${PLAN_WRITER} ${BINARY_DIR}/plans)
run_checked(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${BINARY_DIR}/build -G ${GENERATOR}
  -DCMAKE_C_COMPILER=${C_COMPILER} -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release -Dl4rt_DIR=${L4RT_DIR})
run_checked(${CMAKE_COMMAND} --build ${BINARY_DIR}/build)

run_checked(${BINARY_DIR}/build/l4rt_consumer ${BINARY_DIR}/plans/generate.l4plan)
message(STATUS "${OUT}")
foreach(want "program kind: generate" "max seq: 16" "vocab: 64" "generated: 1 2 3 ")
  string(FIND "${OUT}" "${want}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "l4rt_consumer output lacks '${want}':\n${OUT}")
  endif()
endforeach()

run_checked(${BINARY_DIR}/build/l4rt_consumer_cxx ${BINARY_DIR}/plans/generate.l4plan)
message(STATUS "${OUT}")
foreach(want "cxx program kind: generate" "cxx missing plan: /nonexistent/plan.l4plan: cannot open")
  string(FIND "${OUT}" "${want}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "l4rt_consumer_cxx output lacks '${want}':\n${OUT}")
  endif()
endforeach()
