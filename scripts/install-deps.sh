#!/usr/bin/env bash
# Installs the Debian packages Kura's build and tests need, and nothing when they are present.
#   scripts/install-deps.sh build   # compiler pieces for RocksDB (bindgen needs libclang) and
#                                   # protoc for the gRPC code generated from proto/
#   scripts/install-deps.sh test    # build + real clients for end-to-end tests (Gradle, Java,
#                                   # Bazel 4.2 as bazel-bootstrap, ccache), strace (a
#                                   # regression test watches fsync calls)
#   scripts/install-deps.sh bench   # build + nginx and wrk for benches/load.sh
set -euo pipefail

profile="${1:-build}"
packages=(build-essential clang libclang-dev protobuf-compiler pkg-config git curl ca-certificates)
case "$profile" in
  build) ;;
  test) packages+=(gradle default-jdk-headless strace bazel-bootstrap ccache python3-venv) ;;
  bench) packages+=(nginx-light wrk) ;;
  *) echo "usage: $0 build|test|bench" >&2; exit 2 ;;
esac

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done

if ((${#missing[@]})); then
  echo "kura: installing Debian packages: ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "kura: run as root or install sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  # Through env: sudo drops the caller's environment.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "kura: cargo is missing; install Rust (https://rustup.rs) version 1.89 or newer" >&2
  exit 1
fi
# Debian's own cargo is too old for edition 2024; a minimal rustup profile lacks the linters
# the test command runs.
cargo_minor=$(cargo --version | sed -n 's/^cargo 1\.\([0-9]*\).*/\1/p')
if [ -z "$cargo_minor" ] || [ "$cargo_minor" -lt 89 ]; then
  echo "kura: $(cargo --version) is too old; install Rust 1.89 or newer (https://rustup.rs)" >&2
  exit 1
fi
if [ "$profile" = test ]; then
  for tool in fmt clippy; do
    cargo "$tool" --version >/dev/null 2>&1 || {
      echo "kura: cargo $tool is missing; rustup component add $( [ $tool = fmt ] && echo rustfmt || echo clippy )" >&2
      exit 1
    }
  done
fi
