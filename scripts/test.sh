#!/usr/bin/env bash
# The whole test suite, as one command (README, CI): installs what the build needs, then
# formatting, lints and every test of the workspace. Safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# The benchmark crate talks gRPC to etcd; its build script needs protoc.
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# The generated Prometheus rules are checked with the real promtool and loaded into a real
# Prometheus (both from the Debian package prometheus).
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need_apt+=(prometheus)
# The PostgreSQL backend's tests start a real PostgreSQL 15 (initdb, postgres, pg_ctl, psql).
PG_BIN="${GAPGUARD_PG_BIN:-/usr/lib/postgresql/15/bin}"
[ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/psql" ] || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing: ${need_apt[*]} (install them with: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Black-box tests start the real binary; build it in the profile the tests use.
cargo build --locked -p gapguard
cargo test --workspace --locked
# The black-box suites once more, every server over PostgreSQL instead of the embedded store
# (one suite, two backends; the multi-node tests are in crates/gapguard/tests/postgres.rs).
GAPGUARD_TEST_BACKEND=postgres cargo test --locked -p gapguard \
  --test flows --test primitives --test concurrency --test auth --test security --test metrics --test crash --test bad_input
