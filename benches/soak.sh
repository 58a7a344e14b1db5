#!/usr/bin/env bash
# Soak: mixed load against one node for a long time while its resident memory is sampled.
#
#   benches/soak.sh                 # 30 minutes
#   KURA_SOAK_DURATION=5m benches/soak.sh
#
# Load: wrk, 16 connections, GET and PUT (one request in five is a PUT) of 2,000 keys whose
# bodies run from 1 KiB to 1 MiB, against a capacity of 256 MiB: the keys hold about 300 MB, so
# eviction runs all the time and GETs of evicted keys miss (404 is expected). RSS is read from
# /proc every 10 s into rss.csv, with what RocksDB holds of it (memtables, block cache). The
# verdict: after the first 5 minutes every sample is within ±10 % of the median of those
# samples. It reports; a drift is printed as MISS and exits 0.
#
# Environment:
#   KURA_SOAK_DURATION=30m    how long the load runs (wrk duration syntax)
#   KURA_BENCH_SKIP_BUILD=1   use the existing $CARGO_TARGET_DIR/release/kura
#   KURA_SOAK_KEEP=1          keep the work dir (log, rss.csv, wrk output)
#   any KURA_* config variable is passed to the node (e.g. KURA_STORAGE_DURABILITY=fsync)
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=benches/prepare.sh
. benches/prepare.sh

duration="${KURA_SOAK_DURATION:-30m}"

work="$(mktemp -d "${TMPDIR:-/tmp}/kura-soak.XXXXXX")"
kura_pid=""
sampler_pid=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null
  if [ -n "$kura_pid" ]; then
    kill -TERM "$kura_pid" 2>/dev/null || true
    wait "$kura_pid" 2>/dev/null || true
  fi
  if [ "${KURA_SOAK_KEEP:-0}" = 1 ]; then
    echo "soak.sh: work dir kept: $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port="$(free_port)"
KURA_SERVER_HTTP="127.0.0.1:$port" \
  KURA_SERVER_GRPC=127.0.0.1:0 \
  KURA_STORAGE_DATA_DIR="$work/data" \
  KURA_STORAGE_CAPACITY="${KURA_STORAGE_CAPACITY:-256MiB}" \
  KURA_LOG_FORMAT=json KURA_LOG_LEVEL=warn \
  "$bin" serve >"$work/kura.log" 2>&1 &
kura_pid=$!
for ((i = 0; i < 300; i++)); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready" || true)" = 200 ] && break
  kill -0 "$kura_pid" 2>/dev/null || { cat "$work/kura.log" >&2; exit 1; }
  sleep 0.1
done

# Key i always has the same size, one of eight from 1 KiB to 1 MiB.
cat >"$work/mixed.lua" <<'EOF'
local sizes = {1024, 4096, 16384, 65536, 131072, 262144, 524288, 1048576}
local bodies = {}
for i, size in ipairs(sizes) do bodies[i] = string.rep(string.char(64 + i), size) end
local keys = 2000
function init(args) math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000) end
function request()
  local key = math.random(0, keys - 1)
  local path = "/api/cache/gradle/soak-" .. key .. "?account_handle=dev"
  if math.random(1, 5) == 1 then
    return wrk.format("PUT", path, nil, bodies[key % #sizes + 1])
  end
  return wrk.format("GET", path)
end
EOF

echo "soak: $duration of mixed load on 127.0.0.1:$port (work dir $work); RSS sampled every 10 s"
# Each sample: the process's RSS, and what RocksDB holds of it (from /metrics), in KiB.
echo "seconds,rss_kib,memtables_kib,block_cache_kib" >"$work/rss.csv"
(
  start=$SECONDS
  while kill -0 "$kura_pid" 2>/dev/null; do
    rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$kura_pid/status" 2>/dev/null || true)"
    rocksdb="$(curl -s "http://127.0.0.1:$port/metrics" | awk '
      /^kura_storage_rocksdb_memory_bytes\{part="memtables"\}/ {m = $2}
      /^kura_storage_rocksdb_memory_bytes\{part="block_cache"\}/ {c = $2}
      END {printf "%d,%d", m / 1024, c / 1024}' || true)"
    [ -n "$rss" ] && echo "$((SECONDS - start)),$rss,${rocksdb:-0,0}" >>"$work/rss.csv"
    sleep 10
  done
) &
sampler_pid=$!

wrk -t2 -c16 -d"$duration" --timeout 30s -s "$work/mixed.lua" "http://127.0.0.1:$port/" >"$work/wrk.txt" 2>&1 ||
  { cat "$work/wrk.txt" >&2; echo "soak.sh: wrk failed" >&2; exit 1; }
kill -0 "$kura_pid" 2>/dev/null || { tail -n 30 "$work/kura.log" >&2; echo "soak.sh: the node died" >&2; exit 1; }
kill "$sampler_pid" 2>/dev/null || true
sampler_pid=""

grep -E "Requests/sec|Non-2xx|Socket errors|requests in" "$work/wrk.txt" || true
echo "memory at the end (bytes):"
curl -s "http://127.0.0.1:$port/metrics" |
  grep -E '^kura_(process_resident_memory_bytes|storage_rocksdb_memory_bytes|body_memory_bytes)' || true
echo "samples (seconds, RSS KiB, RocksDB memtables KiB, RocksDB block cache KiB):"
paste -sd' ' "$work/rss.csv"
awk -F, 'NR > 1 && $1 >= 300 {print $2}' "$work/rss.csv" | sort -n | awk '
  { v[NR] = $1 }
  END {
    if (NR == 0) { print "no samples after the first 5 minutes: run longer"; exit }
    median = v[int((NR + 1) / 2)]
    low = v[1]; high = v[NR]
    printf "after 5 min: %d samples, median %.1f MiB, min %.1f MiB (%+.1f %%), max %.1f MiB (%+.1f %%)\n",
      NR, median / 1024, low / 1024, (low - median) * 100 / median, high / 1024, (high - median) * 100 / median
    within = (low >= median * 0.9 && high <= median * 1.1)
    printf "RSS within +-10 %% of its median after the first 5 minutes: %s\n", (within ? "PASS" : "MISS")
  }'
