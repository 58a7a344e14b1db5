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
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "kura: cargo is missing; install Rust (https://rustup.rs) version 1.89 or newer" >&2
  exit 1
fi
