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
