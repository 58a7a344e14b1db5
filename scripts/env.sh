# Shared settings for the scripts: one cargo target dir outside the clone, so a fresh clone on a
# machine that built Kura before reuses the compiled RocksDB (an empty cache works too).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kura/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
