#!/usr/bin/env bash
# Soak: steady transfer and signalling load against one `floe dev` (its
# store and room bus on a private Redis) for a set time. Every 10 s it
# samples the dev process's RSS and open file descriptors, TURN's live
# allocations and Redis's key count. Over the second half it fits a line
# to each and fails when a slope passes its threshold:
#
#   RSS               1 MiB/min     open fds        0.5/min
#   allocations       0.5/min       Redis keys      1/min
#
#   scripts/soak.sh [MINUTES]        (default 30)
#
# The load: five streams, started 12 s apart, each running `floe loadtest
# transfer` back to back: 50 s runs of 4 pairs in new rooms (living 120 s,
# so rooms expire at the rate they are made), sending file after file at
# 200 kbit/s, 30% of the pairs dropping and re-opening their WebSocket
# mid-transfer. Staggered, the streams add up to a steady load (each run
# ramps up and down). Every run's ledger must reconcile exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-30}"
source scripts/bench-lib.sh

command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 1; }
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  --logfile "$work/redis.log" --daemonize yes --pidfile "$work/redis.pid"
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis_pid=$(cat "$work/redis.pid")
pids+=("$redis_pid")

FLOE_LOG=warn "$floe" dev --data-dir "$work/dev" --signal-port 0 --control-port 0 --turn-port 0 \
  --turn-http-port 0 --redis-url "redis://127.0.0.1:$redis_port" >"$work/dev.log" 2>&1 &
dev_pid=$!
pids+=("$dev_pid")
for _ in $(seq 300); do [ -s "$work/dev/endpoints.json" ] && break; sleep 0.1; done
[ -s "$work/dev/endpoints.json" ] || { cat "$work/dev.log" >&2; exit 1; }
endpoint() { python3 -c "import json,sys; print(json.load(open('$work/dev/endpoints.json'))['$1'])"; }
signal_url=$(endpoint signal_url)
control_url=$(endpoint control_url)
turn_ops=$(endpoint turn_ops_url)
# A tenant per load stream, so each run's ledger is its own.
export FLOE_CONTROL_URL="$control_url" FLOE_ADMIN_TOKEN=$(endpoint admin_token)
for k in 0 1 2 3 4; do
  "$floe" tenant create --id "soak-$k" --name "soak $k" --turn true >/dev/null
  "$floe" tenant --json create-key "soak-$k" >"$work/key-$k.json"
done
key_of() { python3 -c "import json; print(json.load(open('$work/key-$1.json'))['$2'])"; }

seconds=$((MINUTES * 60))
echo "== soak: ${MINUTES} min against floe dev (pid $dev_pid) on Redis :$redis_port"
samples="$work/samples.tsv"
printf 't_s\trss_kib\tfds\tallocations\tredis_keys\n' >"$samples"
start=$(date +%s)
(
  while true; do
    now=$(( $(date +%s) - start ))
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$dev_pid/status")
    fds=$(ls "/proc/$dev_pid/fd" | wc -l)
    allocs=$(curl -fs "$turn_ops/metrics" | awk '/^floe_turn_allocations\{/ {s += $2} END {print s + 0}')
    keys=$(redis-cli -p "$redis_port" dbsize)
    printf '%s\t%s\t%s\t%s\t%s\n' "$now" "$rss" "$fds" "$allocs" "$keys" >>"$samples"
    printf '\r  %4d/%d s  rss %s KiB  fds %s  allocations %s  redis keys %s   ' \
      "$now" "$seconds" "$rss" "$fds" "$allocs" "$keys" >&2
    sleep 10
  done
) &
pids+=($!)

# One stream of load runs until the soak's time is up; a failure is
# written to $work/failed.
stream() {
  local k=$1 runs=0
  sleep $((k * 12))
  while (( $(date +%s) - start < seconds - 50 )); do
    runs=$((runs + 1))
    if ! FLOE_KEY_ID=$(key_of "$k" id) FLOE_KEY_SECRET=$(key_of "$k" secret) \
        "$floe" loadtest transfer --signal-url "$signal_url" --control-url "$control_url" \
        --tenant "soak-$k" --pairs 4 --bytes 65536 --rate-kbps 200 --churn 0.3 --join-rate 2 --duration-secs 50 \
        --room-ttl-secs 120 --timeout-secs 60 --settle-secs 30 >"$work/load-$k.txt" 2>"$work/load-$k.err"; then
      echo "stream $k run $runs failed: $(tail -3 "$work/load-$k.err")" >>"$work/failed"; return
    fi
    if ! grep -q "→ EXACT" "$work/load-$k.txt"; then
      echo "stream $k run $runs: $(grep reconciliation "$work/load-$k.txt")" >>"$work/failed"; return
    fi
    echo "$k" >>"$work/runs"
  done
}
streams=()
for k in 0 1 2 3 4; do stream "$k" & streams+=($!); done
for p in "${streams[@]}"; do wait "$p"; done
echo >&2
if [ -s "$work/failed" ]; then cat "$work/failed" >&2; exit 1; fi
echo "$(wc -l <"$work/runs") load runs in 5 streams, every ledger exact; one of the last:"
cat "$work/load-0.txt"

# The slopes: over the second half of the time every stream was running.
python3 - "$samples" "$((seconds - 60))" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
data = [[float(x) for x in r] for r in rows if len(r) == 5]
data = [r for r in data if 60 <= r[0] <= float(sys.argv[2])]
half = data[len(data) // 2:]
if len(half) < 3:
    sys.exit("too few samples for a slope: run longer")
# Per minute; thresholds as stated in the script's header.
series = [("RSS", 1, 1 / 1024, "MiB", 1.0), ("open fds", 2, 1, "", 0.5),
          ("allocations", 3, 1, "", 0.5), ("Redis keys", 4, 1, "", 1.0)]
t = [r[0] / 60 for r in half]
tm = sum(t) / len(t)
failed = False
print("slopes over the second half (%d samples):" % len(half))
for name, col, scale, unit, limit in series:
    y = [r[col] * scale for r in half]
    ym = sum(y) / len(y)
    slope = sum((a - tm) * (b - ym) for a, b in zip(t, y)) / sum((a - tm) ** 2 for a in t)
    verdict = "ok" if slope <= limit else "FAIL"
    failed |= slope > limit
    print("  %-12s %+9.3f %s/min (limit %s; first %.1f, last %.1f)  %s"
          % (name, slope, unit or "", limit, half[0][col] * scale, half[-1][col] * scale, verdict))
sys.exit(1 if failed else 0)
EOF
