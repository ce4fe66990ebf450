//===- l4-compare.cpp - compare two safetensors files by key --------------===//
//
// Checks l4-run outputs against reference data (the HF goldens, another
// backend's output) and prints the measured errors, for golden tests.
//
//===----------------------------------------------------------------------===//
#include "io/safetensors.h"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace l4c::io;

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: l4-compare ACTUAL EXPECTED [--tol KEY=LIMIT]... "
               "[--exact KEY]... [--grads REL_L2,MAX_RATIO] "
               "[--adamw ABS] [--tol-rows KEY=LIMIT,FRACTION] "
               "[--match KEY=FRACTION[,FROM[,TO]]]\n"
               "  --tol:   max |actual - expected| <= LIMIT * max |expected|\n"
               "  --tol-rows: at least FRACTION of the rows (last dim) have "
               "max |actual - expected| <= LIMIT * max |expected|\n"
               "  --exact: integer tensors must be identical\n"
               "  --match: at least FRACTION of the integers in columns "
               "[FROM, TO) (default: all) of each row are identical\n"
               "  --grads: every grad.* of EXPECTED: relative L2 error <= "
               "REL_L2 and max abs error <= MAX_RATIO * max |expected|\n"
               "  --adamw: every adamw.* of EXPECTED: abs error <= ABS where "
               "|grad.*| > 1e-6\n");
  return 2;
}

bool load(const Checkpoint &c, const std::string &key, DType as,
          std::vector<char> &out, std::vector<int64_t> &shape,
          const char *which) {
  Checkpoint::Entry e;
  if (!c.find(key, e)) {
    std::fprintf(stderr, "l4-compare: error: %s has no tensor '%s'\n", which,
                 key.c_str());
    return false;
  }
  shape = e.info->shape;
  uint64_t n = e.info->numel();
  out.resize(n * dtypeSize(as));
  Status st = c.read(key, as, out.data(), n);
  if (!st.ok()) {
    std::fprintf(stderr, "l4-compare: error: %s\n", st.error.c_str());
    return false;
  }
  return true;
}

std::string shapeStr(const std::vector<int64_t> &s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i)
    r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

} // namespace

int main(int argc, char **argv) {
  if (argc < 3)
    return usage();
  Checkpoint actual, expected;
  for (auto [path, ck] : {std::pair{argv[1], &actual}, {argv[2], &expected}}) {
    Status st = Checkpoint::open(path, *ck);
    if (!st.ok()) {
      std::fprintf(stderr, "l4-compare: error: %s\n", st.error.c_str());
      return 2;
    }
  }
  bool ok = true;
  for (int i = 3; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc)
      return usage();
    std::string arg = argv[++i];
    std::vector<char> a, e;
    std::vector<int64_t> sa, se;
    if (flag == "--tol") {
      size_t eq = arg.find('=');
      if (eq == std::string::npos)
        return usage();
      std::string key = arg.substr(0, eq);
      double limit = std::atof(arg.c_str() + eq + 1);
      if (!load(actual, key, DType::F32, a, sa, "actual") ||
          !load(expected, key, DType::F32, e, se, "expected"))
        return 2;
      if (sa != se) {
        std::printf("%s: shape %s, expected %s: FAIL\n", key.c_str(),
                    shapeStr(sa).c_str(), shapeStr(se).c_str());
        ok = false;
        continue;
      }
      const float *pa = reinterpret_cast<const float *>(a.data());
      const float *pe = reinterpret_cast<const float *>(e.data());
      size_t n = a.size() / sizeof(float);
      double maxErr = 0, maxRef = 0;
      bool finite = true;
      for (size_t k = 0; k < n; ++k) {
        if (!std::isfinite(pa[k]))
          finite = false;
        maxErr = std::max(maxErr, std::fabs(double(pa[k]) - pe[k]));
        maxRef = std::max(maxRef, std::fabs(double(pe[k])));
      }
      double rel = maxRef > 0 ? maxErr / maxRef : maxErr;
      bool pass = finite && rel <= limit;
      std::printf("%s: max abs err %.3e, max |expected| %.3e, ratio %.3e "
                  "(limit %.1e)%s: %s\n",
                  key.c_str(), maxErr, maxRef, rel, limit,
                  finite ? "" : ", non-finite values", pass ? "ok" : "FAIL");
      ok &= pass;
    } else if (flag == "--tol-rows") {
      size_t eq = arg.find('=');
      double limit = 0, fraction = 0;
      if (eq == std::string::npos ||
          std::sscanf(arg.c_str() + eq + 1, "%lf,%lf", &limit, &fraction) != 2)
        return usage();
      std::string key = arg.substr(0, eq);
      if (!load(actual, key, DType::F32, a, sa, "actual") ||
          !load(expected, key, DType::F32, e, se, "expected"))
        return 2;
      if (sa != se || sa.empty()) {
        std::printf("%s: shape %s, expected %s: FAIL\n", key.c_str(),
                    shapeStr(sa).c_str(), shapeStr(se).c_str());
        ok = false;
        continue;
      }
      const float *pa = reinterpret_cast<const float *>(a.data());
      const float *pe = reinterpret_cast<const float *>(e.data());
      size_t n = a.size() / sizeof(float), width = size_t(sa.back());
      size_t rows = width ? n / width : 0;
      double maxRef = 0, num = 0, den = 0;
      for (size_t k = 0; k < n; ++k) {
        maxRef = std::max(maxRef, std::fabs(double(pe[k])));
        double d = double(pa[k]) - pe[k];
        num += d * d;
        den += double(pe[k]) * pe[k];
      }
      size_t good = 0;
      double worst = 0;
      for (size_t r = 0; r < rows; ++r) {
        double err = 0;
        for (size_t c = 0; c < width; ++c) {
          double d = std::fabs(double(pa[r * width + c]) - pe[r * width + c]);
          err = std::isnan(d) ? INFINITY : std::max(err, d);
        }
        double ratio = maxRef > 0 ? err / maxRef : err;
        worst = std::max(worst, ratio);
        good += ratio <= limit;
      }
      double frac = rows ? double(good) / double(rows) : 0;
      bool pass = rows && frac >= fraction;
      std::printf("%s: %zu of %zu rows within %.1e of max |expected| (%.1f%%, "
                  "need %.1f%%), worst row %.3e, rel L2 %.3e: %s\n",
                  key.c_str(), good, rows, limit, 100 * frac, 100 * fraction,
                  worst, den > 0 ? std::sqrt(num / den) : std::sqrt(num),
                  pass ? "ok" : "FAIL");
      ok &= pass;
    } else if (flag == "--match") {
      size_t eq = arg.find('=');
      double fraction = 0;
      long long from = 0, to = -1;
      if (eq == std::string::npos ||
          std::sscanf(arg.c_str() + eq + 1, "%lf,%lld,%lld", &fraction, &from,
                      &to) < 1)
        return usage();
      std::string key = arg.substr(0, eq);
      if (!load(actual, key, DType::I64, a, sa, "actual") ||
          !load(expected, key, DType::I64, e, se, "expected"))
        return 2;
      if (to < 0 && !sa.empty())
        to = sa.back();
      if (sa != se || sa.empty() || from < 0 || from >= to || to > sa.back()) {
        std::printf("%s: shape %s, expected %s (columns %lld..%lld): FAIL\n",
                    key.c_str(), shapeStr(sa).c_str(), shapeStr(se).c_str(),
                    from, to);
        ok = false;
        continue;
      }
      size_t width = size_t(sa.back()), n = a.size() / 8, same = 0, all = 0;
      for (size_t k = 0; k < n; ++k)
        if (k % width >= size_t(from) && k % width < size_t(to)) {
          ++all;
          same += std::memcmp(&a[k * 8], &e[k * 8], 8) == 0;
        }
      double frac = all ? double(same) / double(all) : 0;
      bool pass = all && frac >= fraction;
      std::printf("%s: %zu of %zu identical in columns %lld..%lld (%.1f%%, "
                  "need %.1f%%): %s\n",
                  key.c_str(), same, all, from, to - 1, 100 * frac,
                  100 * fraction, pass ? "ok" : "FAIL");
      ok &= pass;
    } else if (flag == "--exact") {
      if (!load(actual, arg, DType::I64, a, sa, "actual") ||
          !load(expected, arg, DType::I64, e, se, "expected"))
        return 2;
      size_t mismatches = 0, first = 0;
      if (sa == se)
        for (size_t k = 0; k < a.size() / 8; ++k)
          if (std::memcmp(&a[k * 8], &e[k * 8], 8) != 0 && !mismatches++)
            first = k;
      bool pass = sa == se && mismatches == 0;
      if (sa != se)
        std::printf("%s: shape %s, expected %s: FAIL\n", arg.c_str(),
                    shapeStr(sa).c_str(), shapeStr(se).c_str());
      else
        std::printf("%s: %zu of %zu differ%s: %s\n", arg.c_str(), mismatches,
                    a.size() / 8,
                    mismatches ? (" (first at flat index " +
                                  std::to_string(first) + ")")
                                     .c_str()
                               : "",
                    pass ? "ok" : "FAIL");
      ok &= pass;
    } else if (flag == "--grads" || flag == "--adamw") {
      double relLimit = 0, ratioLimit = 0, absLimit = 0;
      if (flag == "--grads") {
        if (std::sscanf(arg.c_str(), "%lf,%lf", &relLimit, &ratioLimit) != 2)
          return usage();
      } else {
        absLimit = std::atof(arg.c_str());
      }
      std::string prefix = flag == "--grads" ? "grad." : "adamw.";
      size_t tensors = 0, failures = 0;
      double worstRel = 0, worstRatio = 0, worstAbs = 0;
      std::string worstName;
      for (const Checkpoint::Entry &ent : expected.entries()) {
        const std::string &key = ent.info->name;
        if (key.compare(0, prefix.size(), prefix) != 0)
          continue;
        ++tensors;
        if (!load(actual, key, DType::F32, a, sa, "actual") ||
            !load(expected, key, DType::F32, e, se, "expected"))
          return 2;
        if (sa != se) {
          std::printf("%s: shape %s, expected %s: FAIL\n", key.c_str(),
                      shapeStr(sa).c_str(), shapeStr(se).c_str());
          ++failures;
          continue;
        }
        const float *pa = reinterpret_cast<const float *>(a.data());
        const float *pe = reinterpret_cast<const float *>(e.data());
        size_t n = a.size() / sizeof(float);
        bool bad = false;
        if (flag == "--grads") {
          double err2 = 0, ref2 = 0, maxErr = 0, maxRef = 0;
          for (size_t k = 0; k < n; ++k) {
            double d = double(pa[k]) - pe[k];
            bad |= !std::isfinite(pa[k]);
            err2 += d * d;
            ref2 += double(pe[k]) * pe[k];
            maxErr = std::max(maxErr, std::fabs(d));
            maxRef = std::max(maxRef, std::fabs(double(pe[k])));
          }
          double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
          double ratio = maxRef > 0 ? maxErr / maxRef : maxErr;
          bad |= rel > relLimit || ratio > ratioLimit;
          if (rel > worstRel)
            worstRel = rel, worstName = key;
          worstRatio = std::max(worstRatio, ratio);
          if (bad)
            std::printf("%s: rel L2 %.3e, max abs ratio %.3e: FAIL\n",
                        key.c_str(), rel, ratio);
        } else {
          std::vector<char> g;
          std::vector<int64_t> sg;
          if (!load(expected, "grad." + key.substr(prefix.size()), DType::F32,
                    g, sg, "expected"))
            return 2;
          const float *pg = reinterpret_cast<const float *>(g.data());
          double maxErr = 0;
          for (size_t k = 0; k < n; ++k)
            if (std::fabs(pg[k]) > 1e-6)
              maxErr = std::max(maxErr, std::fabs(double(pa[k]) - pe[k]));
          bad = maxErr > absLimit;
          if (maxErr > worstAbs)
            worstAbs = maxErr, worstName = key;
          if (bad)
            std::printf("%s: max abs err %.3e: FAIL\n", key.c_str(), maxErr);
        }
        failures += bad;
      }
      if (flag == "--grads")
        std::printf("grads: %zu tensors, worst rel L2 %.3e (%s), worst max abs "
                    "ratio %.3e (limits %.1e, %.1e): %s\n",
                    tensors, worstRel, worstName.c_str(), worstRatio, relLimit,
                    ratioLimit, failures || !tensors ? "FAIL" : "ok");
      else
        std::printf("adamw: %zu tensors, worst abs err %.3e (%s) (limit "
                    "%.1e): %s\n",
                    tensors, worstAbs, worstName.c_str(), absLimit,
                    failures || !tensors ? "FAIL" : "ok");
      ok &= failures == 0 && tensors > 0;
    } else {
      return usage();
    }
  }
  return ok ? 0 : 1;
}
