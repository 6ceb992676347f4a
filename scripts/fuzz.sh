#!/usr/bin/env bash
# Runs the libFuzzer targets in fuzz/ for a bounded time each, on stable Rust.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 300 s per target, every target
#   FUZZ_SECONDS=30 scripts/fuzz.sh           the same, from the environment (make fuzz-short)
#
# cargo-fuzz wants nightly for its sanitizer flags; stable rustc accepts them with
# RUSTC_BOOTSTRAP=1, and the AddressSanitizer runtime ships with the stable toolchain, so the
# targets build with ASan, coverage instrumentation and debug assertions on Rust 1.95 as is.
# New inputs go to a work corpus under the target directory (the committed seeds in
# fuzz/corpus/ are only read). A crash stops the run with a non-zero exit and leaves the input
# in $FUZZ_OUT/artifacts/<target>/: minimise it (cargo fuzz tmin), fix the bug, and commit the
# input to fuzz/regressions/<target>/, where tests/fuzz_regressions.rs replays it in make test.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${FUZZ_SECONDS:-300}
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(nbd_handshake nbd_requests nbd_client blkif_ring store_metadata config send_stream)
build=("${targets[@]}")
[ $# -eq 0 ] && build=("")   # cargo fuzz build with no target builds them all in one go

scripts/deps.sh fuzz >/dev/null
target_dir=${CARGO_TARGET_DIR:-$root/target}/fuzz
out=${FUZZ_OUT:-$target_dir/work}
export RUSTC_BOOTSTRAP=1

start=$(date +%s)
echo "fuzz: building ${targets[*]} (ASan, -O)"
for t in "${build[@]}"; do
  (cd fuzz && cargo fuzz build -O --target-dir "$target_dir" ${t:+"$t"})
done
echo "fuzz: built in $(( $(date +%s) - start )) s"

bin=$target_dir/x86_64-unknown-linux-gnu/release
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
  # Replay the inputs that once failed, then fuzz from the work corpus and the seeds.
  regress=()
  if compgen -G "fuzz/regressions/$t/*" >/dev/null; then
    regress=(fuzz/regressions/"$t"/*)
    "$bin/$t" -rss_limit_mb=2048 -timeout=30 "${regress[@]}" >"$out/$t.regressions.log" 2>&1 || {
      echo "fuzz: $t FAILED on a committed regression input (see $out/$t.regressions.log)"
      failed+=("$t"); continue; }
  fi
  echo "fuzz: $t for ${seconds} s"
  # -rss_limit_mb / -malloc_limit_mb: an absurd allocation from hostile input is a failure.
  # -timeout: one input taking this long is a hang.
  if "$bin/$t" "$out/corpus/$t" "fuzz/corpus/$t" \
      -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=30 \
      -max_len=16384 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
      >"$out/$t.log" 2>&1; then
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|DONE' "$out/$t.log" | tr '\n' ' ' | sed "s/^/fuzz: $t: /"; echo
  else
    echo "fuzz: $t FAILED; the last lines of $out/$t.log:"
    tail -40 "$out/$t.log"
    ls -1 "$out/artifacts/$t/"
    failed+=("$t")
  fi
done
echo "fuzz: total $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failures in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
