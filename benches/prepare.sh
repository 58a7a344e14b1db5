# Sourced by the benchmark scripts from the repo root: installs what they need (nginx, wrk),
# sets up cargo like the other scripts, builds the release binary from this clone (unless
# KURA_BENCH_SKIP_BUILD=1) and sets $bin to it.
scripts/install-deps.sh bench
# shellcheck source=scripts/env.sh
. scripts/env.sh
bin="$CARGO_TARGET_DIR/release/kura"
if [ "${KURA_BENCH_SKIP_BUILD:-0}" != 1 ]; then
  # The shared target dir may hold another clone's build of kura: rebuild it from this one.
  kura_own_build_from_this_clone
  cargo build --release --locked --bin kura
fi
[ -x "$bin" ] || { echo "$0: no binary at $bin" >&2; exit 1; }

# Prints a free port on 127.0.0.1, below the kernel's ephemeral range: a port from that range
# can be taken by any outgoing connection (wrk's, curl's) between this check and the bind.
free_port() {
  local low port i
  low="$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
  for ((i = 0; i < 200; i++)); do
    port=$((10000 + RANDOM % (low - 10000)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "no free port found on 127.0.0.1" >&2
  return 1
}
