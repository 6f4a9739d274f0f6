#!/usr/bin/env bash
# Regenerates src/tether/v1 from protos/ (the only producer of generated code).
# Usage: scripts/genproto.sh [OUT_DIR]   (default: src)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-src}
py=${PYTHON:-.venv/bin/python}
bindir=$(dirname "$py")
mkdir -p "$out/tether/v1"
rm -f "$out"/tether/v1/*_pb2*.py "$out"/tether/v1/*_pb2*.pyi
PATH="$bindir:$PATH" "$py" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  protos/tether/v1/*.proto
cat > "$out/tether/v1/__init__.py" <<'PY'
"""Generated from protos/tether/v1 by `make proto`. Do not edit."""
PY
