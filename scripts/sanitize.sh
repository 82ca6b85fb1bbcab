#!/usr/bin/env bash
# Build libffsplit_ort with -fsanitize=address,undefined into build/sanitize and run
# tests/test_ort_plugin.py, tests/test_ort_int4.py, tests/test_fused_ffn.py, tests/test_fused_ffn_nbits.py and the fuzz test tests/test_fuzz_ops.py against it (the fuzz workers
# inherit LD_PRELOAD / ASAN_OPTIONS; a sanitizer report aborts a worker, which the fuzz test
# reports as a crash). Exits non-zero on any sanitizer report or test failure.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
bdir=${FFSPLIT_SANITIZE_BUILD:-$root/build/sanitize}
if [[ -z "${ONNXRUNTIME_INCLUDE_DIR:-}" && -d "$root/.deps/ortdev/usr/include/onnxruntime" ]]; then
  export ONNXRUNTIME_INCLUDE_DIR="$root/.deps/ortdev/usr/include/onnxruntime"
fi
cxx=${CXX:-g++}

cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
  -DFFSPLIT_SANITIZE=address,undefined
cmake --build "$bdir"
lib="$bdir/plugins/onnxruntime/libffsplit_ort.so"

# python itself is not instrumented: preload the sanitizer runtimes the library links against
asan=$("$cxx" -print-file-name=libasan.so)
ubsan=$("$cxx" -print-file-name=libubsan.so)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
LD_PRELOAD="$asan $ubsan" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  FFSPLIT_ORT_LIBRARY="$lib" \
  "$python" -m pytest -q -p no:cacheprovider tests/test_ort_plugin.py tests/test_ort_int4.py tests/test_fuzz_ops.py tests/test_fused_ffn.py tests/test_fused_ffn_nbits.py "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
  echo "sanitize.sh: sanitizer report found" >&2
  exit 1
fi
if [[ $status -ne 0 ]]; then
  echo "sanitize.sh: tests failed (exit $status)" >&2
  exit "$status"
fi
grep -q "passed" "$log" || { echo "sanitize.sh: no test ran (library not picked up?)" >&2; exit 1; }
echo "sanitize.sh: clean"
