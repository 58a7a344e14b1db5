#!/usr/bin/env bash
# End-to-end load benchmark: Kura against nginx, same payloads, same loopback, same run.
#
#   benches/load.sh
#
# Builds the release binary, starts nginx (config: benches/load/nginx.conf; static files and
# WebDAV PUT) and Kura (Gradle surface, static auth, every GET verified as 00-overview.md says)
# on 127.0.0.1, loads the same bodies into both and checks they return identical bytes, then
# drives each with wrk, nginx and Kura alternating, three runs per scenario, median reported:
#   get-4k    GET of 4 KiB bodies, 10,000 distinct keys     wrk -t2 -c32 --latency
#   get-256k  GET of 256 KiB bodies, 10,000 distinct keys   wrk -t2 -c32 --latency
#   get-64m   GET of one 64 MiB body                        wrk -t1 -c4
#   put-1m    PUT of a 1 MiB body (same key: overwrite)     wrk -t2 -c8
# and prints req/s, p50 and p99 for both, the kura/nginx ratio and whether it meets its target.
# Then:
#   durability  4 KiB PUTs to distinct keys, data dir on the disk of KURA_BENCH_DISK_DIR: 32
#               writers in "fsync" durability against 32 in "process" (target >= 0.7: RocksDB's
#               group commit), one writer in "fsync", and the disk's fsync latency
#   auth        get-4k against Kura with auth "none" and "introspection" (warm decision cache,
#               a fake control plane on loopback); target: introspection within 5 % of none
# It reports; it is not a test: a missed target still exits 0. A server that does not start,
# dies mid-run, or bytes that differ exit non-zero.
#
# Environment:
#   KURA_BENCH_DURATION=30s   length of each wrk run
#   KURA_BENCH_RUNS=3         runs per scenario and server (the median is reported)
#   KURA_BENCH_KEYS=10000     distinct keys of the GET data sets
#   KURA_BENCH_DISK_DIR=...   where the durability scenario's data dirs go (default: the work
#                             dir); must be a real disk, not tmpfs, or fsync costs nothing
#   KURA_BENCH_SKIP_BUILD=1   use the existing $CARGO_TARGET_DIR/release/kura (no cargo build)
#   KURA_BENCH_KEEP=1         keep the work dir (logs, wrk outputs) and print its path
#   KURA_BENCH_NGINX_EXTRA='client_body_buffer_size 1m;'
#                             extra directives for nginx's http block (tuning experiments)
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=benches/prepare.sh
. benches/prepare.sh

duration="${KURA_BENCH_DURATION:-30s}"
runs="${KURA_BENCH_RUNS:-3}"
keys="${KURA_BENCH_KEYS:-10000}"
nginx_bin=/usr/sbin/nginx

work="$(mktemp -d "${TMPDIR:-/tmp}/kura-bench.XXXXXX")"
nginx_pid=""
kura_pid=""
extra_pids=() # the auth-mode comparison's nodes and fake control plane

stop() { # pid: TERM, up to 10 s to exit, then KILL
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  [ -n "$kura_pid" ] && stop "$kura_pid"
  [ -n "$nginx_pid" ] && stop "$nginx_pid"
  local pid
  for pid in "${extra_pids[@]}"; do stop "$pid"; done
  if [ "${KURA_BENCH_KEEP:-0}" = 1 ]; then
    echo "load.sh: work dir kept: $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
  echo "load.sh: $*" >&2
  exit 1
}

# A free TCP port on 127.0.0.1: a random high port that nothing accepts on. (Runs in a
# subshell; nginx listens before Kura's port is picked, so the two never get the same one.)
# Waits until url answers 200; fails early when pid has exited.
wait_up() {
  local name="$1" pid="$2" url="$3" log="$4" i
  for ((i = 0; i < 300; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$log" >&2 || true
      die "$name exited during startup (log above)"
    fi
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 30 "$log" >&2 || true
  die "$name did not answer 200 on $url within 30 s"
}

alive() {
  kill -0 "$2" 2>/dev/null || die "$1 is no longer running (log: $3)"
}

# --- machine ---------------------------------------------------------------------------------
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "== Kura vs nginx load benchmark"
echo "machine: $(nproc) cores, ${cpu_model:-unknown CPU}, kernel $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM"
echo "nginx:   $("$nginx_bin" -v 2>&1 | sed 's/^nginx version: //')"
echo "wrk:     $(wrk -v 2>&1 | awk 'NR == 1 {print $2}')"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min; other work on the machine skews the numbers)"
echo "each run: $duration, load generator on the same machine"
[ -z "${KURA_BENCH_NGINX_EXTRA:-}" ] || echo "nginx extra directives: $KURA_BENCH_NGINX_EXTRA"

# --- payloads --------------------------------------------------------------------------------
mkdir -p "$work/www" "$work/nginx/body" "$work/nginx/logs" "$work/kura-data" "$work/out"
head -c 4096 /dev/urandom >"$work/www/small4k"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$work/www/large64m"
head -c $((1024 * 1024)) /dev/urandom >"$work/put1m"

# --- nginx -----------------------------------------------------------------------------------
nginx_port="$(free_port)"
user_line=""
[ "$(id -u)" -eq 0 ] && user_line="user root;" # workers must read and write the private work dir
sed -e "s|@USER_LINE@|$user_line|" -e "s|@WORK@|$work|g" -e "s|@PORT@|$nginx_port|" \
  -e "s|@EXTRA@|${KURA_BENCH_NGINX_EXTRA:-}|" benches/load/nginx.conf >"$work/nginx/nginx.conf"
"$nginx_bin" -t -q -c "$work/nginx/nginx.conf" -p "$work/nginx/" 2>"$work/nginx/logs/test.log" ||
  { cat "$work/nginx/logs/test.log" >&2; die "nginx rejected its config"; }
"$nginx_bin" -c "$work/nginx/nginx.conf" -p "$work/nginx/" >"$work/nginx/logs/stderr.log" 2>&1 &
nginx_pid=$!
nginx_url="http://127.0.0.1:$nginx_port"
wait_up nginx "$nginx_pid" "$nginx_url/up" "$work/nginx/logs/error.log"

# --- kura ------------------------------------------------------------------------------------
kura_port="$(free_port)"
token="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
token_sha="$(printf '%s' "$token" | sha256sum | awk '{print $1}')"
cat >"$work/tokens.toml" <<EOF
[[tokens]]
name = "bench"
sha256 = "$token_sha"
[tokens.cache_grants]
account = { read = ["dev"], write = ["dev"] }
EOF
KURA_SERVER_HTTP="127.0.0.1:$kura_port" \
  KURA_SERVER_GRPC=127.0.0.1:0 \
  KURA_STORAGE_DATA_DIR="$work/kura-data" \
  KURA_STORAGE_DURABILITY=process \
  KURA_AUTH_MODE=static \
  KURA_AUTH_STATIC_TOKENS_FILE="$work/tokens.toml" \
  KURA_LOG_FORMAT=json \
  KURA_LOG_LEVEL=warn \
  KURA_LIMITS_GRADLE=2GiB \
  "$bin" serve >"$work/kura.log" 2>&1 &
kura_pid=$!
kura_url="http://127.0.0.1:$kura_port"
wait_up kura "$kura_pid" "$kura_url/up" "$work/kura.log"
auth="Authorization: Bearer $token"
kura_sha="$(curl -s "$kura_url/metrics" | sed -n 's/^kura_build_info{.*git_sha="\([^"]*\)".*/\1/p' | head -n 1)"
echo "kura:    $("$bin" --version), built from ${kura_sha:-unknown commit}, $bin"
echo
kura_path() { echo "/api/cache/gradle/$1?account_handle=dev"; }

# --- preload and check bytes -----------------------------------------------------------------
http() { # method url [curl args...]: prints the status code, fails on transport errors
  local method="$1" url="$2"
  shift 2
  curl -sS -o /dev/null -w '%{http_code}' -X "$method" -H "$auth" "$@" "$url"
}
expect_2xx() {
  case "$2" in 2??) ;; *) die "$1 answered $2" ;; esac
}
for name in small4k large64m; do
  expect_2xx "kura PUT $name" "$(http PUT "$kura_url$(kura_path "$name")" --data-binary "@$work/www/$name")"
done
for name in small4k large64m; do
  curl -sS -f -H "$auth" -o "$work/out/nginx-$name" "$nginx_url/$name" || die "nginx GET $name failed"
  curl -sS -f -H "$auth" -o "$work/out/kura-$name" "$kura_url$(kura_path "$name")" || die "kura GET $name failed"
  cmp "$work/www/$name" "$work/out/nginx-$name" || die "nginx returned different bytes for $name"
  cmp "$work/www/$name" "$work/out/kura-$name" || die "kura returned different bytes for $name"
done
# PUT round trip on both, so the PUT scenario measures a path that is known to work.
expect_2xx "nginx PUT put1m" "$(http PUT "$nginx_url/put/put1m" --data-binary "@$work/put1m")"
expect_2xx "kura PUT put1m" "$(http PUT "$kura_url$(kura_path put1m)" --data-binary "@$work/put1m")"
curl -sS -f -o "$work/out/nginx-put1m" "$nginx_url/put/put1m" || die "nginx GET put1m failed"
curl -sS -f -H "$auth" -o "$work/out/kura-put1m" "$kura_url$(kura_path put1m)" || die "kura GET put1m failed"
cmp "$work/put1m" "$work/out/nginx-put1m" || die "nginx returned different bytes for put1m"
cmp "$work/put1m" "$work/out/kura-put1m" || die "kura returned different bytes for put1m"
rm -f "$work/out/"*
echo "bytes identical on both servers: small4k, large64m, put1m"
echo

# The GET data sets: the same random bodies as files for nginx and as artifacts on Kura.
python3 benches/load/preload.py "$work" "$kura_port" "$nginx_port" "$token" k4 4096 "$keys" ||
  die "preloading the 4 KiB set failed"
python3 benches/load/preload.py "$work" "$kura_port" "$nginx_port" "$token" k256 262144 "$keys" ||
  die "preloading the 256 KiB set failed"
echo

# wrk script for the PUT scenario: the 1 MiB payload as the body of every request.
cat >"$work/put.lua" <<EOF
local f = assert(io.open([[$work/put1m]], "rb"))
wrk.method = "PUT"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

# random_keys file prefix suffix: a wrk script that requests prefix<random key>suffix.
# Each wrk thread runs the script in its own interpreter: init() seeds each differently, or both
# threads would ask for the same keys in the same order.
random_keys() {
  cat >"$1" <<EOF
function init(args) math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000) end
request = function()
  return wrk.format(nil, "$2" .. math.random(0, $keys - 1) .. "$3")
end
EOF
}
random_keys "$work/k4-nginx.lua" "/k4/" ""
random_keys "$work/k4-kura.lua" "/api/cache/gradle/k4-" "?account_handle=dev"
random_keys "$work/k256-nginx.lua" "/k256/" ""
random_keys "$work/k256-kura.lua" "/api/cache/gradle/k256-" "?account_handle=dev"

# --- measure ---------------------------------------------------------------------------------
# to_us "123.45ms": a wrk latency in microseconds.
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    f = (u == "us" ? 1 : u == "ms" ? 1000 : u == "s" ? 1000000 : u == "m" ? 60000000 : 0)
    printf "%.0f", n * f
  }'
}

# run_wrk label server threads conns url [wrk args...]: writes $work/wrk-<label>-<server>.txt
# and sets r_<label>_<server> to "req/s|transfer|non-2xx|socket errors|p50 us|p99 us".
run_wrk() {
  local label="$1" server="$2" threads="$3" conns="$4" url="$5"
  shift 5
  local out="$work/wrk-$label-$server.txt"
  wrk -t"$threads" -c"$conns" -d"$duration" --timeout 30s --latency -H "$auth" "$@" "$url" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed for $label on $server"; }
  case "$server" in
    nginx) alive nginx "$nginx_pid" "$work/nginx/logs/error.log" ;;
    kura) alive kura "$kura_pid" "$work/kura.log" ;;
  esac
  local rps xfer non2xx sockerr p50 p99
  rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
  xfer="$(awk '/^Transfer\/sec:/ {print $2}' "$out")"
  non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")"
  sockerr="$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$out")"
  p50="$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")"
  p99="$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")"
  [ -n "$rps" ] || { cat "$out" >&2; die "could not read Requests/sec from wrk for $label on $server"; }
  printf -v "r_${label//-/_}_$server" '%s|%s|%s|%s|%s|%s' \
    "$rps" "${xfer:-?}" "${non2xx:-0}" "${sockerr:-0}" "$p50" "$p99"
  printf '  %-18s %-6s %12s req/s  p50 %8s us  p99 %8s us  non-2xx %s  socket errors %s\n' \
    "$label" "$server" "$rps" "$p50" "$p99" "${non2xx:-0}" "${sockerr:-0}"
}

# scenario label threads conns nginx_url kura_url [nginx wrk args] -- [kura wrk args]: $runs
# runs per server, alternating; each run's result is kept as r_<label>_<server>_<run>.
scenario() {
  local label="$1" threads="$2" conns="$3" nginx_target="$4" kura_target="$5" run var server
  shift 5
  local nginx_args=() kura_args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    nginx_args+=("$1")
    shift
  done
  [ $# -gt 0 ] && shift
  kura_args=("$@")
  for ((run = 1; run <= runs; run++)); do
    for server in nginx kura; do
      if [ "$server" = nginx ]; then
        run_wrk "$label" nginx "$threads" "$conns" "$nginx_target" "${nginx_args[@]}"
      else
        run_wrk "$label" kura "$threads" "$conns" "$kura_target" "${kura_args[@]}"
      fi
      var="r_${label//-/_}_$server"
      printf -v "${var}_$run" '%s' "${!var}"
    done
  done
}

# median label server: the run with the median req/s, followed by "|" and every run's req/s.
median() {
  local label="$1" server="$2" run var all=""
  for ((run = 1; run <= runs; run++)); do
    var="r_${label//-/_}_${server}_$run"
    all+="${!var}"$'\n'
  done
  local each
  each="$(printf '%s' "$all" | cut -d'|' -f1 | paste -sd/)"
  printf '%s' "$all" | sort -t'|' -k1,1g |
    awk -v n="$runs" -v each="$each" 'NR == int((n + 1) / 2) {print $0 "|" each}'
}

echo "running wrk ($duration each, $runs alternating runs per server):"
scenario get-4k 2 32 "$nginx_url/" "$kura_url/" -s "$work/k4-nginx.lua" -- -s "$work/k4-kura.lua"
scenario get-256k 2 32 "$nginx_url/" "$kura_url/" -s "$work/k256-nginx.lua" -- -s "$work/k256-kura.lua"
scenario get-64m 1 4 "$nginx_url/large64m" "$kura_url$(kura_path large64m)"
scenario put-1m 2 8 "$nginx_url/put/put1m" "$kura_url$(kura_path put1m)" \
  -s "$work/put.lua" -- -s "$work/put.lua"
echo

# --- report ----------------------------------------------------------------------------------
flagged=0
row() { printf '%-9s %11s %11s %6s %6s %-6s %15s %15s  %s\n' "$@"; }
echo "medians of $runs runs; p50/p99 latency in microseconds, from the median run"
row scenario "nginx req/s" "kura req/s" ratio target result "nginx p50/p99" "kura p50/p99" "each run's req/s (nginx; kura)"
row -------- ----------- ---------- ----- ------ ------ ------------- ------------ ------------------------------
report() { # label target
  local label="$1" target="$2"
  local n_rps n_non2xx n_sock n_p50 n_p99 n_all k_rps k_non2xx k_sock k_p50 k_p99 k_all
  IFS='|' read -r n_rps _ n_non2xx n_sock n_p50 n_p99 n_all <<<"$(median "$label" nginx)"
  IFS='|' read -r k_rps _ k_non2xx k_sock k_p50 k_p99 k_all <<<"$(median "$label" kura)"
  local ratio result
  ratio="$(awk -v k="$k_rps" -v n="$n_rps" 'BEGIN {printf "%.2f", (n > 0 ? k / n : 0)}')"
  result="$(awk -v k="$k_rps" -v n="$n_rps" -v t="$target" \
    'BEGIN {print (n > 0 && k / n >= t + 0 ? "PASS" : "MISS")}')"
  if [ "$n_non2xx" != 0 ] || [ "$n_sock" != 0 ] || [ "$k_non2xx" != 0 ] || [ "$k_sock" != 0 ]; then
    result="$result(errors: nginx non-2xx=$n_non2xx sock=$n_sock, kura non-2xx=$k_non2xx sock=$k_sock)"
    flagged=1
  fi
  row "$label" "$n_rps" "$k_rps" "$ratio" ">=$target" "$result" "$n_p50/$n_p99" "$k_p50/$k_p99" "$n_all; $k_all"
}
report get-4k 1.0
report get-256k 0.9
report get-64m 1.0
report put-1m 1.0
echo
echo "Ratio = kura req/s / nginx req/s (medians)."
if [ "$flagged" = 1 ]; then
  echo "WARNING: some runs had non-2xx responses or socket errors; their numbers are suspect." >&2
fi

# --- durability: group commit ----------------------------------------------------------------
disk_dir="$(mktemp -d "${KURA_BENCH_DISK_DIR:-$work}/kura-durability.XXXXXX")"
[ "$(stat -f -c %T "$disk_dir")" != tmpfs ] ||
  echo "WARNING: $disk_dir is on tmpfs: fsync costs nothing there" >&2
head -c 4096 /dev/urandom >"$work/put4k"
# Distinct keys: each wrk thread numbers its own requests.
cat >"$work/put4k.lua" <<EOF
local f = assert(io.open([[$work/put4k]], "rb"))
local body = f:read("*a")
f:close()
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local n = 0
function request()
  n = n + 1
  return wrk.format("PUT", "/api/cache/gradle/gc-" .. id .. "-" .. n .. "?account_handle=dev", nil, body)
end
EOF
# durability_node name durability: a node with its data dir under $disk_dir; sets $launched_url.
durability_node() {
  local name="$1" port pid
  port="$(free_port)"
  mkdir -p "$disk_dir/$name"
  KURA_SERVER_HTTP="127.0.0.1:$port" KURA_SERVER_GRPC=127.0.0.1:0 \
    KURA_STORAGE_DATA_DIR="$disk_dir/$name" \
    KURA_STORAGE_DURABILITY="$2" KURA_AUTH_MODE=static \
    KURA_AUTH_STATIC_TOKENS_FILE="$work/tokens.toml" \
    KURA_LOG_FORMAT=json KURA_LOG_LEVEL=warn "$bin" serve >"$work/$name.log" 2>&1 &
  pid=$!
  extra_pids+=("$pid")
  launched_url="http://127.0.0.1:$port"
  wait_up "kura ($name)" "$pid" "$launched_url/up" "$work/$name.log"
}
echo
echo "durability: 4 KiB PUTs to distinct keys ($duration each), data dirs in $disk_dir:"
durability_node fsync fsync
fsync_url="$launched_url"
durability_node process process
process_url="$launched_url"
run_wrk put-4k-fsync-32 kura 2 32 "$fsync_url/" -s "$work/put4k.lua"
run_wrk put-4k-process-32 kura 2 32 "$process_url/" -s "$work/put4k.lua"
run_wrk put-4k-fsync-1 kura 1 1 "$fsync_url/" -s "$work/put4k.lua"
fsync_latency="$(python3 - "$disk_dir" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
block = os.urandom(4096)
times = []
with open(path, "wb") as f:
    for _ in range(200):
        f.write(block)
        start = time.perf_counter()
        os.fsync(f.fileno())
        times.append((time.perf_counter() - start) * 1e6)
os.remove(path)
times.sort()
print(f"p50 {times[len(times) // 2]:.0f} us, p99 {times[len(times) * 99 // 100]:.0f} us")
PY
)"
# shellcheck disable=SC2154 # assigned by run_wrk through printf -v
IFS='|' read -r gc_fsync _ <<<"$r_put_4k_fsync_32_kura"
# shellcheck disable=SC2154
IFS='|' read -r gc_process _ <<<"$r_put_4k_process_32_kura"
# shellcheck disable=SC2154
IFS='|' read -r gc_single _ <<<"$r_put_4k_fsync_1_kura"
echo "fsync of a 4 KiB append on this disk: $fsync_latency"
awk -v f="$gc_fsync" -v p="$gc_process" -v s="$gc_single" 'BEGIN {
  r = (p > 0 ? f / p : 0)
  printf "32 writers: fsync %.0f req/s, process %.0f req/s; 1 writer, fsync: %.0f req/s\n", f, p, s
  printf "fsync/process = %.2f (target >= 0.7): %s\n", r, (r >= 0.7 ? "PASS" : "MISS")
}'

# --- auth modes: small GET with "introspection" (warm cache) against "none" -------------------
# A fake control plane: every token is active with read/write on account "dev".
cat >"$work/control_plane.py" <<'PY'
import http.server, json, sys
ANSWER = json.dumps({"active": True, "cache_grants": {"account": {"read": ["dev"], "write": ["dev"]}}}).encode()
class Introspect(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Introspect).serve_forever()
PY
plane_port="$(free_port)"
python3 "$work/control_plane.py" "$plane_port" >"$work/control_plane.log" 2>&1 &
plane_pid=$!
extra_pids+=("$plane_pid")
wait_up "control plane" "$plane_pid" "http://127.0.0.1:$plane_port/" "$work/control_plane.log"

# launch_kura name VAR=value...: starts a node on a free port, preloads small4k, warms it up,
# and sets $launched_url.
launch_kura() {
  local name="$1" port pid
  shift
  port="$(free_port)"
  mkdir -p "$work/$name-data"
  env KURA_SERVER_HTTP="127.0.0.1:$port" KURA_SERVER_GRPC=127.0.0.1:0 \
    KURA_STORAGE_DATA_DIR="$work/$name-data" \
    KURA_LOG_FORMAT=json KURA_LOG_LEVEL=warn "$@" "$bin" serve >"$work/$name.log" 2>&1 &
  pid=$!
  extra_pids+=("$pid")
  launched_url="http://127.0.0.1:$port"
  wait_up "kura ($name)" "$pid" "$launched_url/up" "$work/$name.log"
  expect_2xx "kura ($name) PUT small4k" \
    "$(http PUT "$launched_url$(kura_path small4k)" --data-binary "@$work/www/small4k")"
  # The first authorized request fills the decision cache (introspection).
  curl -sS -f -H "$auth" -o /dev/null "$launched_url$(kura_path small4k)" ||
    die "kura ($name) GET failed"
}

echo
echo "auth cost (get-4k, $duration each):"
launch_kura none KURA_AUTH_MODE=none
none_url="$launched_url"
launch_kura introspection KURA_AUTH_MODE=introspection \
  KURA_AUTH_CONTROL_PLANE_URL="http://127.0.0.1:$plane_port" \
  KURA_CONTROL_PLANE_CLIENT_ID=bench KURA_CONTROL_PLANE_CLIENT_SECRET=bench-secret
introspection_url="$launched_url"
run_wrk auth-none kura 2 32 "$none_url$(kura_path small4k)"
run_wrk auth-introspection kura 2 32 "$introspection_url$(kura_path small4k)"
# shellcheck disable=SC2154 # assigned by run_wrk through printf -v
IFS='|' read -r none_rps _ <<<"$r_auth_none_kura"
IFS='|' read -r intro_rps _ <<<"$r_auth_introspection_kura"
awk -v i="$intro_rps" -v n="$none_rps" 'BEGIN {
  r = (n > 0 ? i / n : 0)
  printf "introspection/none = %.3f (target >= 0.95): %s\n", r, (r >= 0.95 ? "PASS" : "MISS")
}'
