# Shared by the bench scripts (sourced, not run): a release build of
# floe, a work folder, background processes stopped on exit, free ports.
# Expects to be sourced from the repository root.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/floe/target}"
cargo build --release -j2 --quiet
floe="$CARGO_TARGET_DIR/release/floe"
work="$(mktemp -d -t floe-bench.XXXXXX)"
# Background processes to stop on exit.
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "$1 not up" >&2; exit 1; }
