#!/usr/bin/env bash
# Regenerates the protos into a scratch dir and fails if src/tether/v1 drifted.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/genproto.sh "$tmp" >/dev/null 2>&1
if ! diff -r -x __pycache__ "$tmp/tether/v1" src/tether/v1 >"$tmp/diff.txt"; then
  echo "generated code in src/tether/v1 drifted from protos/: run 'make proto' and commit" >&2
  head -40 "$tmp/diff.txt" >&2
  exit 1
fi
echo "proto-check: src/tether/v1 matches protos/"
