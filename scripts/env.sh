# Shared settings for the scripts: one cargo target dir outside the clone, so a fresh clone on a
# machine that built Kura before reuses the compiled RocksDB (an empty cache works too).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kura/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The cache is keyed by crate, not by clone: cargo would take another clone's fresh-looking
# build of kura itself for this one's. Dependencies (RocksDB above all) are safe to share, so
# only kura's own artifacts are dropped, and rebuilt from this clone (about a minute).
kura_own_build_from_this_clone() {
  cargo clean --release --package kura --quiet 2>/dev/null || true
}
