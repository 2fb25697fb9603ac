#!/usr/bin/env bash
# Regenerate the gRPC stubs of adaserve_jax/server/adaserve.proto.
#   scripts/gen_proto.sh            writes adaserve_jax/server/adaserve_pb2{,_grpc}.py
#   scripts/gen_proto.sh OUT_DIR    writes them into OUT_DIR/adaserve_jax/server/ instead
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT}"
mkdir -p "$OUT/adaserve_jax/server"
cd "$ROOT"
"$PY" -m grpc_tools.protoc -I . \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  adaserve_jax/server/adaserve.proto
