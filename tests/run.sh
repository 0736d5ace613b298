#!/usr/bin/env bash
# The whole test suite, the README's second command. Run from anywhere; as root for the
# tests that switch uids and the real-Docker end-to-end scenarios (they say "skipped" otherwise).
#
# Stages: lint (fmt, clippy) · unit, integration and property tests · fuzz targets for a
# bounded time each · the Debian package · real rootless Docker through the router.
# Environment: FUZZ_SECONDS (default 30 per target), PROPTEST_CASES (default: per test),
# SKIP_E2E=1 / SKIP_FUZZ=1 to leave a stage out while iterating.
set -uo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
failed_stages=()
stage() {
  local name=$1
  shift
  printf '\n=== stage: %s\n' "$name"
  local started=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    printf '=== stage %s: ok (%ss)\n' "$name" $((SECONDS - started))
  else
    failed=$((failed + 1))
    failed_stages+=("$name")
    printf '=== stage %s: FAILED (%ss)\n' "$name" $((SECONDS - started))
  fi
}

lint() {
  cargo fmt --all -- --check && cargo clippy --all-targets --locked -- -D warnings
}

unit_and_integration() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast
  else
    cargo test --locked --no-fail-fast
  fi
}

fuzz() {
  if [ "${SKIP_FUZZ:-}" = 1 ]; then
    echo "fuzz: skipped (SKIP_FUZZ=1)"
    return 0
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz || return 1
  fi
  fuzz/run-all.sh "${FUZZ_SECONDS:-30}"
}

real_docker() {
  if [ "${SKIP_E2E:-}" = 1 ]; then
    echo "real-docker: skipped (SKIP_E2E=1)"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "real-docker: skipped: needs root (it creates test users and their rootless daemons)"
    return 0
  fi
  cargo build --release --locked && tests/e2e/real-docker.sh target/release/docker-socket-router
}

package() {
  local deb extracted
  deb=$(packaging/build-deb.sh) || return 1
  extracted=$(mktemp -d)
  dpkg-deb -x "$deb" "$extracted" &&
    test -f "$extracted/lib/systemd/system/docker-socket-router.service" &&
    "$extracted/usr/bin/docker-socket-router" --version | grep -q '^docker-socket-router ' &&
    echo "package: $deb unpacks and runs"
  local status=$?
  rm -rf "$extracted"
  return $status
}

stage lint lint
stage tests unit_and_integration
stage fuzz fuzz
stage package package
stage real-docker real_docker

echo
if [ "$failed" -gt 0 ]; then
  echo "failed stages: ${failed_stages[*]}"
fi
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
