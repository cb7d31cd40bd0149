#!/usr/bin/env bash
# TURN benchmark: coturn and `floe turn` on loopback with equivalent
# settings, driven by the same load. Per scenario each server is started
# fresh; the figures that tell servers apart are server CPU time per
# relayed message (user + system, /proc/PID/stat), loss and peak RSS
# (VmHWM). Loss is split by where it happened: `server_drops` counts the
# datagrams the server's own sockets dropped (/proc/net/udp, read while
# its allocations are still open); the rest overflowed the load
# generator's sockets. Also an allocation storm and a STUN Binding flood (floe's load
# tester for both). Prints a table per scenario and floe/coturn ratios.
#
# (a), (b), (p) relay client to client: two allocations of one server,
# which floe hands over in memory (floe-kernel: through the kernel, as
# coturn does). (r) is the common production case: every client relays to
# a plain UDP peer that is not an allocation on the server (coturn's
# turnutils_peer, an echo server), so both servers pay the kernel path.
#
#   scripts/bench-turn.sh            (all scenarios)
#   SCENARIOS="a p" scripts/bench-turn.sh
#   REPEAT=1 SCENARIOS=bind scripts/bench-turn.sh
#   BEFORE=/path/to/older/floe scripts/bench-turn.sh
#
# BEFORE adds an older floe binary on the kernel path to every round
# ("before-kernel" in (a), (b), (p); "before" in the others), for a
# before/after table from one run.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIOS="${SCENARIOS:-a b p r storm bind}"
# Figures swing by a third from run to run on a shared 2-core box: every
# scenario runs this many times, servers taking turns within each round,
# and the table shows the medians.
REPEAT="${REPEAT:-5}"
BEFORE="${BEFORE:-}"

command -v turnserver >/dev/null || { echo "coturn is not installed (apt-get install coturn)" >&2; exit 1; }
source scripts/bench-lib.sh
# One server at a time, replaced per scenario (also stopped by cleanup).
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  server_pid=""
}
trap 'stop_server; cleanup' EXIT

SECRET="bench-turn-secret-0123456789"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
peak_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# Datagrams dropped by the UDP sockets process $1 holds open.
socket_drops() {
  python3 - "$1" <<'PY'
import os, re, sys
fds = f"/proc/{sys.argv[1]}/fd"
inodes = set()
for fd in os.listdir(fds):
    try:
        m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"{fds}/{fd}"))
    except OSError:
        continue
    if m:
        inodes.add(m.group(1))
drops = 0
for table in ("/proc/net/udp", "/proc/net/udp6"):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[9] in inodes:
            drops += int(f[-1])
print(drops)
PY
}

start_server() { # kind port
  case "$1" in
    coturn)
      turnserver -n --no-cli --no-tls --no-dtls --listening-ip 127.0.0.1 --relay-ip 127.0.0.1 \
        --listening-port "$2" --min-port 20000 --max-port 29999 --use-auth-secret \
        --static-auth-secret "$SECRET" --realm floe --allow-loopback-peers --no-multicast-peers \
        --total-quota 0 --user-quota 0 --log-file "$work/coturn.log" --simple-log \
        --pidfile "$work/coturn.pid" >/dev/null 2>&1 &
      ;;
    floe|floe-kernel|before|before-kernel)
      local hairpin="" bin="$floe"
      case "$1" in *-kernel) hairpin="--kernel-hairpin" ;; esac
      case "$1" in before*) bin="$BEFORE" ;; esac
      FLOE_LOG=warn "$bin" turn $hairpin --listen "127.0.0.1:$2" --http-listen "127.0.0.1:$(free_port)" \
        --turn-secrets "k1=$SECRET" --allow-peer 127.0.0.0/8 --relay-ip 127.0.0.1 \
        --relay-port-min 30000 --relay-port-max 39999 --max-allocations 100000 \
        --auth-failures-per-min 100000 2>>"$work/$1.log" &
      ;;
  esac
  server_pid=$!
  for _ in $(seq 100); do
    "$floe" loadtest stun-binding --target "127.0.0.1:$2" --requests 1 --timeout-ms 100 >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "$1 did not start" >&2; exit 1
}

results="$work/results.tsv"
: >"$results"

# The UDP echo peer of (r), started when first needed.
peer_port=""
echo_peer() {
  if [ -z "$peer_port" ]; then
    peer_port=$(free_port)
    turnutils_peer -L 127.0.0.1 -p "$peer_port" >/dev/null 2>&1 &
    pids+=("$!")
  fi
}

uclient_run() { # scenario kind clients messages size interval [peer]
  local port; port=$(free_port)
  # Client to client (-y), or each client to the echo peer (-e/-r).
  local to=(-y)
  if [ "${7:-}" = peer ]; then echo_peer; to=(-e 127.0.0.1 -r "$peer_port"); fi
  start_server "$2" "$port"
  local before; before=$(cpu_ticks "$server_pid")
  local out="$work/$1-$2.txt"
  timeout 300 turnutils_uclient "${to[@]}" -c -m "$3" -n "$4" -l "$5" -z "$6" -W "$SECRET" \
    -u "k1:bench:room:peer" -p "$port" 127.0.0.1 >"$out" 2>&1 || true
  local after; after=$(cpu_ticks "$server_pid")
  local peak; peak=$(peak_kib "$server_pid")
  local drops; drops=$(socket_drops "$server_pid")
  stop_server
  python3 - "$out" "$1" "$2" "$before" "$after" "$peak" "$drops" >>"$results" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
scenario, kind, before, after, peak = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
drops = int(sys.argv[7])
def last(pattern):
    m = re.findall(pattern, text)
    return m[-1] if m else None
sent = int(last(r"tot_send_msgs=(\d+)") or 0)
recv = int(last(r"tot_recv_msgs=(\d+)") or 0)
lost = last(r"Total lost packets (\d+) \(([\d.]+)%\)")
loss_pct = float(lost[1]) if lost else (100.0 * (sent - recv) / sent if sent else 100.0)
if sent == 0:
    # The client never got going (it happens now and then on a busy box):
    # no figure rather than a 100% loss in the medians.
    print(f"{scenario}\t{kind}\tfailed_runs\t1")
    sys.exit(0)
cpu_us = (after - before) * 10_000  # 100 ticks per second
per_msg = cpu_us / sent
print(f"{scenario}\t{kind}\tcpu_per_msg_us\t{per_msg:.2f}")
print(f"{scenario}\t{kind}\tloss_pct\t{loss_pct:.3f}")
print(f"{scenario}\t{kind}\tserver_drops\t{drops}")
print(f"{scenario}\t{kind}\tpeak_rss_mib\t{peak/1024:.1f}")
print(f"{scenario}\t{kind}\tmessages\t{sent}")
PY
}

loadtest_run() { # scenario kind args...
  local scenario="$1" kind="$2"; shift 2
  local port; port=$(free_port)
  start_server "$kind" "$port"
  local before; before=$(cpu_ticks "$server_pid")
  if ! "$floe" loadtest --json "$work/$scenario-$kind.json" "$@" --target "127.0.0.1:$port" >/dev/null; then
    echo "$scenario against $kind failed; the server's log ends:" >&2
    tail -5 "$work/$kind.log" >&2 || true
    exit 1
  fi
  local after; after=$(cpu_ticks "$server_pid")
  local peak; peak=$(peak_kib "$server_pid")
  stop_server
  python3 - "$work/$scenario-$kind.json" "$scenario" "$kind" "$before" "$after" "$peak" >>"$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
scenario, kind, before, after, peak = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rate = r.get("allocations_per_sec", r.get("bindings_per_sec"))
done = r.get("allocated", r.get("answered"))
print(f"{scenario}\t{kind}\trate_per_sec\t{rate:.0f}")
print(f"{scenario}\t{kind}\tcpu_per_op_us\t{(after - before) * 10_000 / max(done, 1):.2f}")
print(f"{scenario}\t{kind}\tpeak_rss_mib\t{peak/1024:.1f}")
lat = r.get("latency_ms") or {}
print(f"{scenario}\t{kind}\tp99_ms\t{lat.get('p99', float('nan')):.2f}")
PY
}

for s in $SCENARIOS; do
  # floe-kernel: the uclient pairs relay between two allocations of one
  # server, which floe hands over in memory; --kernel-hairpin sends them
  # through the kernel as coturn does, i.e. the cost with a remote peer.
  kinds="coturn floe"
  case "$s" in a|b|p) kinds="coturn floe floe-kernel" ;; esac
  if [ -n "$BEFORE" ]; then
    case "$s" in a|b|p) kinds="$kinds before-kernel" ;; *) kinds="$kinds before" ;; esac
  fi
  for round in $(seq "$REPEAT"); do
    if [ "$REPEAT" -gt 1 ]; then echo "-- $s: round $round of $REPEAT"; fi
    for kind in $kinds; do
    case "$s" in
      a) echo "== (a) $kind: 50 clients x 1000 x 120 B, unpaced"; uclient_run a "$kind" 50 1000 120 0 ;;
      b) echo "== (b) $kind: 200 clients x 500 x 1000 B, unpaced (burst)"; uclient_run b "$kind" 200 500 1000 0 ;;
      p) echo "== (p) $kind: 200 clients x 500 x 160 B every 20 ms"; uclient_run p "$kind" 200 500 160 20 ;;
      r) echo "== (r) $kind: 200 clients x 500 x 160 B every 20 ms to a remote UDP echo peer"
        uclient_run r "$kind" 200 500 160 20 peer ;;
      storm) echo "== allocation storm $kind: 3000 Allocates, 100 in flight"
        loadtest_run storm "$kind" turn-allocate --secret "$SECRET" --user k1:bench:storm:peer --count 3000 --in-flight 100 ;;
      bind) echo "== STUN Binding flood $kind: 300000 requests, 100 in flight from 4 sockets"
        loadtest_run bind "$kind" stun-binding --requests 300000 --in-flight 100 --sockets 4 ;;
    esac
    done
  done
done

if [ -n "${RESULTS:-}" ]; then cp "$results" "$RESULTS"; fi
python3 - "$results" "$REPEAT" <<'PY'
import sys, collections, statistics
runs = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    s, kind, metric, value = line.rstrip("\n").split("\t")
    runs[(s, metric)][kind].append(float(value))
rows = {k: {kind: (sum(v) if k[1] == "failed_runs" else statistics.median(v)) for kind, v in kinds.items()} for k, kinds in runs.items()}
names = {"a": "(a) 50x1000x120B", "b": "(b) 200x500x1000B burst", "p": "(p) 200x500x160B/20ms",
         "r": "(r) remote peer 160B/20ms",
         "storm": "allocation storm", "bind": "binding flood"}
nan = float("nan")
before = any("before" in kinds for kinds in rows.values())
extra = f" {'before':>10} {'ratio':>8} {'before-kernel':>14} {'ratio':>8}" if before else ""
print(f"\n{'scenario':<26} {'metric':<16} {'coturn':>10} {'floe':>10} {'floe/coturn':>12} {'floe-kernel':>12} {'ratio':>8}{extra}")
for (s, metric), v in sorted(rows.items(), key=lambda kv: (list(names).index(kv[0][0]), kv[0][1])):
    c = v.get("coturn", nan)
    ratio = lambda x: x / c if c else nan
    cell = lambda kind, width: f" {v[kind]:>{width}.2f} {ratio(v[kind]):>8.2f}" if kind in v else " " * (width + 10)
    line = f"{names[s]:<26} {metric:<16} {c:>10.2f} {v.get('floe', nan):>10.2f} {ratio(v.get('floe', nan)):>12.2f}"
    line += cell("floe-kernel", 12)
    if before:
        line += cell("before", 10) + cell("before-kernel", 14)
    print(line.rstrip())
print(f"medians of {sys.argv[2]} rounds; in each round every server runs once, in turn")
print("floe-kernel: floe with --kernel-hairpin (relay to relay through the kernel, as for a remote peer)")
if before:
    print("before: the BEFORE binary (before-kernel: with --kernel-hairpin)")
print("server_drops: datagrams the server's own sockets dropped; the rest of loss_pct overflowed the load generator's")
print("\ntargets: cpu_per_msg_us ratio <= 0.70, loss 0 where coturn has 0, rate_per_sec ratio >= 1.50")
PY
