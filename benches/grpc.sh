#!/usr/bin/env bash
# REAPI over gRPC against the same node's HTTP, from one client binary (benches/reapi.rs):
# ByteStream write/read of 128 KiB blobs, BatchReadBlobs of 4 KiB blobs, ByteStream read of a
# 256 MiB blob, FindMissingBlobs of 10,000 digests and a tiny unary call, each beside HTTP
# PUT/GET of the same payloads; medians of 3 runs. Prints a Markdown table at the end.
#   KURA_BENCH_DURATION=10 KURA_BENCH_RUNS=3 benches/grpc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/prepare.sh
exec cargo bench --locked --bench reapi
