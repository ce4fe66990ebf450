//===- write_test_plan.cpp - writes hand-built plans for tool tests ------===//
//
// Test helper: writes the tiny model's forward and generate plans, a byte
// vocabulary generate plan and an input_ids file into a directory, so tests
// outside the unit test binary (find_package, l4-run) have plans to run.
//
//===----------------------------------------------------------------------===//
#include "io/safetensors.h"
#include "test_plans.h"

#include <cstdio>
#include <string>

using namespace l4c;

static bool write(const std::string &path, const std::vector<uint8_t> &bytes) {
  io::Status s = io::writeFileAtomic(
      path, std::string_view(reinterpret_cast<const char *>(bytes.data()),
                             bytes.size()));
  if (!s.ok())
    std::fprintf(stderr, "l4c_write_test_plan: error: %s\n", s.error.c_str());
  return s.ok();
}

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: l4c_write_test_plan OUT_DIR\n");
    return 2;
  }
  std::string dir = argv[1];
  test::TinyConfig bytes;
  bytes.V = 256;
  if (!write(dir + "/forward.l4plan",
             test::tinyModelPlan("forward", 2, 8).serialize()) ||
      !write(dir + "/generate.l4plan",
             test::tinyModelPlan("generate", 2, 16).serialize()) ||
      !write(dir + "/bytes.l4plan",
             test::tinyModelPlan("generate", 1, 64, bytes).serialize()))
    return 1;
  std::vector<int64_t> ids = {1, 5, 9, 13, 17, 2, 4, 6, 8, 10};
  io::Status s =
      io::writeSafetensors(dir + "/inputs.safetensors",
                           {{"input_ids", io::DType::I64, {2, 5}, ids.data()}});
  if (!s.ok()) {
    std::fprintf(stderr, "l4c_write_test_plan: error: %s\n", s.error.c_str());
    return 1;
  }
  return 0;
}
