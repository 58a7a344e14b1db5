#!/usr/bin/env bash
# End-to-end load benchmark: Kura against nginx, same payloads, same loopback, same run.
#
#   benches/load.sh
#
# Builds the release binary, starts nginx (static files + WebDAV PUT) and Kura (Gradle surface,
# static auth) on 127.0.0.1, checks both return identical bytes, then drives each with wrk:
#   get-4k    GET of a 4 KiB body      wrk -t2 -c32
#   get-64m   GET of a 64 MiB body     wrk -t1 -c4
#   put-1m    PUT of a 1 MiB body      wrk -t2 -c8  (same key/path every time: overwrite)
# and prints requests/sec for both, the kura/nginx ratio and whether it meets its target.
# Then, for the auth cost: get-4k against Kura with auth "none" and with "introspection" (warm
# decision cache, a fake control plane on loopback); target: introspection within 5 % of none.
# It reports; it is not a test: a missed target still exits 0. A server that does not start,
# dies mid-run, or bytes that differ exit non-zero.
#
# Environment:
#   KURA_BENCH_DURATION=10s   length of each wrk run
#   KURA_BENCH_SKIP_BUILD=1   use the existing $CARGO_TARGET_DIR/release/kura (no cargo build)
#   KURA_BENCH_KEEP=1         keep the work dir (logs, wrk outputs) and print its path
#   KURA_BENCH_NGINX_EXTRA='client_body_buffer_size 1m;'
#                             extra directives for nginx's http block (tuning experiments)
set -euo pipefail

cd "$(dirname "$0")/.."
scripts/install-deps.sh bench
# shellcheck source=scripts/env.sh
. scripts/env.sh

duration="${KURA_BENCH_DURATION:-10s}"
nginx_bin=/usr/sbin/nginx
bin="$CARGO_TARGET_DIR/release/kura"

if [ "${KURA_BENCH_SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --locked --bin kura
fi
[ -x "$bin" ] || { echo "load.sh: no binary at $bin" >&2; exit 1; }

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
free_port() {
  local port i
  for ((i = 0; i < 200; i++)); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  die "no free port found on 127.0.0.1"
}

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
cat >"$work/nginx/nginx.conf" <<EOF
$user_line
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
daemon off;
events { worker_connections 1024; }
http {
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  ${KURA_BENCH_NGINX_EXTRA:-}
  server {
    listen 127.0.0.1:$nginx_port;
    root $work/www;
    location = /up { return 200; }
    location / { }
    location /put/ {
      dav_methods PUT;
      client_max_body_size 2g;
      create_full_put_path on;
    }
  }
}
EOF
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

# wrk script for the PUT scenario: the 1 MiB payload as the body of every request.
cat >"$work/put.lua" <<EOF
local f = assert(io.open([[$work/put1m]], "rb"))
wrk.method = "PUT"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

# --- measure ---------------------------------------------------------------------------------
# run_wrk label server threads conns url [wrk args...]: writes $work/wrk-<label>-<server>.txt
run_wrk() {
  local label="$1" server="$2" threads="$3" conns="$4" url="$5"
  shift 5
  local out="$work/wrk-$label-$server.txt"
  wrk -t"$threads" -c"$conns" -d"$duration" --timeout 30s -H "$auth" "$@" "$url" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed for $label on $server"; }
  case "$server" in
    nginx) alive nginx "$nginx_pid" "$work/nginx/logs/error.log" ;;
    kura) alive kura "$kura_pid" "$work/kura.log" ;;
  esac
  local rps xfer non2xx sockerr
  rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
  xfer="$(awk '/^Transfer\/sec:/ {print $2}' "$out")"
  non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")"
  sockerr="$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$out")"
  [ -n "$rps" ] || { cat "$out" >&2; die "could not read Requests/sec from wrk for $label on $server"; }
  printf -v "r_${label//-/_}_$server" '%s|%s|%s|%s' "$rps" "${xfer:-?}" "${non2xx:-0}" "${sockerr:-0}"
  printf '  %-8s %-6s %12s req/s  %10s/s (wrk Transfer/sec)  non-2xx %s  socket errors %s\n' \
    "$label" "$server" "$rps" "${xfer:-?}" "${non2xx:-0}" "${sockerr:-0}"
}

echo "running wrk ($duration each):"
run_wrk get-4k nginx 2 32 "$nginx_url/small4k"
run_wrk get-4k kura 2 32 "$kura_url$(kura_path small4k)"
run_wrk get-64m nginx 1 4 "$nginx_url/large64m"
run_wrk get-64m kura 1 4 "$kura_url$(kura_path large64m)"
run_wrk put-1m nginx 2 8 "$nginx_url/put/put1m" -s "$work/put.lua"
run_wrk put-1m kura 2 8 "$kura_url$(kura_path put1m)" -s "$work/put.lua"
echo

# --- report ----------------------------------------------------------------------------------
flagged=0
row() { printf '%-9s %12s %12s %10s %7s %-7s %12s %12s  %s\n' "$@"; }
row scenario "nginx req/s" "kura req/s" kura/nginx target result "nginx MiB/s" "kura MiB/s" errors
row --------- ----------- ---------- ---------- ------ ------ ----------- ---------- ------
report() { # label target payload_bytes
  local label="$1" target="$2" bytes="$3" n k
  local nvar="r_${label//-/_}_nginx" kvar="r_${label//-/_}_kura"
  IFS='|' read -r n_rps _ n_non2xx n_sock <<<"${!nvar}"
  IFS='|' read -r k_rps _ k_non2xx k_sock <<<"${!kvar}"
  local ratio result errors="none"
  ratio="$(awk -v k="$k_rps" -v n="$n_rps" 'BEGIN {printf "%.2f", (n > 0 ? k / n : 0)}')"
  result="$(awk -v k="$k_rps" -v n="$n_rps" -v t="$target" \
    'BEGIN {print (n > 0 && k / n >= t + 0 ? "PASS" : "MISS")}')"
  n="$(awk -v r="$n_rps" -v b="$bytes" 'BEGIN {printf "%.1f", r * b / 1048576}')"
  k="$(awk -v r="$k_rps" -v b="$bytes" 'BEGIN {printf "%.1f", r * b / 1048576}')"
  if [ "$n_non2xx" != 0 ] || [ "$n_sock" != 0 ] || [ "$k_non2xx" != 0 ] || [ "$k_sock" != 0 ]; then
    errors="FLAG nginx non-2xx=$n_non2xx sock=$n_sock, kura non-2xx=$k_non2xx sock=$k_sock"
    flagged=1
  fi
  row "$label" "$n_rps" "$k_rps" "$ratio" ">=$target" "$result" "$n" "$k" "$errors"
}
report get-4k 1.0 4096
report get-64m 0.9 $((64 * 1024 * 1024))
report put-1m 1.0 $((1024 * 1024))
echo
echo "MiB/s = req/s x payload size (for PUT: bytes uploaded). Ratio = kura req/s / nginx req/s."
if [ "$flagged" = 1 ]; then
  echo "WARNING: some runs had non-2xx responses or socket errors; their numbers are suspect." >&2
fi

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
  env KURA_SERVER_HTTP="127.0.0.1:$port" KURA_STORAGE_DATA_DIR="$work/$name-data" \
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
