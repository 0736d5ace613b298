#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 30), one after another.
# Fails (exit 1) if any target crashes, or if a build fails; a crash leaves its input in
# fuzz/artifacts/<target>/ and the libFuzzer log in fuzz/target/fuzz-logs/<target>.log.
#
#   fuzz/run-all.sh 60            # every target, 60 s each
#   fuzz/run-all.sh 600 ring      # only the named targets
#
# Runs on stable Rust: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the sanitizer flags. The checked-in
# seeds (fuzz/corpus/<target>/) are read, never written: new corpus entries go to
# fuzz/target/fuzz-corpus/<target>/, which persists between runs on one machine.
set -uo pipefail
cd "$(dirname "$0")"

seconds=${1:-30}
shift || true
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing (cargo install --locked cargo-fuzz)" >&2
  exit 1
fi
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz: building ${targets[*]}"
if ! cargo fuzz build; then
  echo "fuzz: build FAILED" >&2
  exit 1
fi

mkdir -p target/fuzz-logs
failed=()
for target in "${targets[@]}"; do
  work=target/fuzz-corpus/$target
  log=target/fuzz-logs/$target.log
  mkdir -p "$work" "corpus/$target" "artifacts/$target"
  echo "fuzz: $target for ${seconds}s"
  # -timeout: one input taking longer than 10 s is a hang, which is a finding too.
  # -len_control=0: long inputs (long operation sequences) from the start, not after minutes.
  cargo fuzz run "$target" "$work" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -len_control=0 -print_final_stats=1 >"$log" 2>&1
  status=$?
  runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    echo "fuzz: $target FAILED (exit $status); last lines of $log:"
    tail -n 40 "$log"
    ls -1 "artifacts/$target" | sed 's/^/fuzz:   artifact: /'
  else
    echo "fuzz: $target ok: ${runs:-no summary} (${execs:-?} executions)"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]}"
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s each without a crash"
