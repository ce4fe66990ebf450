#!/usr/bin/env bash
# Runs every test suite (lit, compiler and runtime unit tests, the emulator's,
# a re-check of the emulator suites' plans with fewer rows) and prints one
# summary; exits non-zero if any test failed.
set -uo pipefail
build=${1:-build}
lit=/usr/lib/llvm-22/bin/lit
passed=0 failed=0 status=0
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

count() { # name passed failed
  printf '  %-22s %5d passed %5d failed\n' "$1" "$2" "$3" >>"$log/summary"
  passed=$((passed + $2)); failed=$((failed + $3))
  [ "$3" -eq 0 ] || status=1
}

gtest_suite() { # name binary
  local name=$1 bin=$2 p f
  if [ ! -x "$bin" ]; then count "$name (missing)" 0 1; return; fi
  "$bin" --gtest_brief=1 >"$log/$name.log" 2>&1
  local rc=$?
  p=$(sed -n 's/.*\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log/$name.log" | tail -1)
  f=$(sed -n 's/.*\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log/$name.log" | tail -1)
  p=${p:-0}; f=${f:-0}
  if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  [ "$f" -eq 0 ] || cat "$log/$name.log"
  count "$name" "$p" "$f"
}

echo "== lit"
"$lit" -sv --time-tests "$build/test" 2>&1 | tee "$log/lit.log" | grep -vE '^(PASS|UNSUPPORTED): ' | tail -n 60
lp=$(sed -n 's/^ *Passed *: *\([0-9]*\).*/\1/p' "$log/lit.log" | tail -1)
lf=$(sed -n 's/^ *Failed *: *\([0-9]*\).*/\1/p' "$log/lit.log" | tail -1)
count lit "${lp:-0}" "${lf:-0}"
[ -n "$lp" ] || count "lit (did not run)" 0 1

echo "== compiler unit tests"
gtest_suite compiler-unit "$build/test/unit/l4c-unit-tests"
echo "== runtime unit tests"
gtest_suite runtime-unit "$build/runtime/l4c_runtime_tests"
echo "== emulator unit tests (mbarriers, TMA, named barriers)"
gtest_suite cuemu-unit "$build/runtime/l4c_cuemu_tests"

echo "== emulator plans again, with fewer rows and batch entries (cuemu-sweep.sh)"
bash "$(dirname "$0")/cuemu-sweep.sh" "$build" >"$log/sweep.log" 2>&1
sw=$(sed -n 's/^cuemu-sweep: \([0-9]*\) plans, \([0-9]*\) failed$/\1 \2/p' "$log/sweep.log")
if [ -n "$sw" ]; then
  set -- $sw
  [ "$2" -eq 0 ] || grep -v ': ok$' "$log/sweep.log" | tail -n 60
  count cuemu-sweep $(($1 - $2)) "$2"
else
  tail -n 20 "$log/sweep.log"
  count "cuemu-sweep (did not run)" 0 1
fi

echo "== runtime package test (an outside project links libl4rt via find_package)"
ctest --test-dir "$build" -R l4rt_find_package --output-on-failure >"$log/ctest.log" 2>&1
cp=$(sed -n 's/.* \([0-9]*\) tests failed out of \([0-9]*\).*/\2 \1/p' "$log/ctest.log" | tail -1)
if [ -n "$cp" ]; then
  set -- $cp
  [ "$2" -eq 0 ] || cat "$log/ctest.log"
  count runtime-package $(($1 - $2)) "$2"
else
  cat "$log/ctest.log"
  count "runtime-package (did not run)" 0 1
fi

echo
echo "summary:"
cat "$log/summary"
echo "$passed passed, $failed failed"
exit $status
