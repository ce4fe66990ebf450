//===- main.cpp - loads a plan through the l4rt C++ wrapper --------------===//
//
// The C++ side of the find_package test: the header-only RAII wrapper over
// the C API, with failures as exceptions.
//
//===----------------------------------------------------------------------===//
#include <l4c/runtime/l4rt.hpp>

#include <cstdio>

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: l4rt_consumer_cxx PLAN\n");
    return 2;
  }
  try {
    l4rt::Plan plan(argv[1]);
    l4rt_plan_summary info = plan.info();
    l4rt::Session session(plan, uint64_t(7));
    std::vector<int64_t> out = session.generate({1, 2, 3}, 1, 3, 3);
    std::printf("cxx program kind: %s\ncxx generated:", info.program_kind);
    for (int64_t id : out)
      std::printf(" %lld", (long long)id);
    std::printf("\n");
    try {
      l4rt::Plan missing("/nonexistent/plan.l4plan");
    } catch (const l4rt::Error &e) {
      std::printf("cxx missing plan: %s\n", e.what());
    }
  } catch (const l4rt::Error &e) {
    std::fprintf(stderr, "l4rt_consumer_cxx: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
