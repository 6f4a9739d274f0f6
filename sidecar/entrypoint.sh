#!/bin/sh
# Entrypoint of the sidecar container: `tether sidecar`, configured only by the
# TETHER_* environment (TETHER_CONTROL, TETHER_TRUST_BUNDLE, TETHER_NODE_ID,
# TETHER_NODE_KEY, TETHER_ENROLL, TETHER_ENROLLMENT_TOKEN_FILE,
# TETHER_AGENTS / TETHER_AGENT_SOCKETS, ...; see docs/deploy.md).
set -eu

# Kubernetes projects secret volumes group-readable (0440) when the pod sets an
# fsGroup, and the sidecar refuses a node key that group or others can read.
# Copy such a key, owner-only, into the state directory (sidecar-only volume).
key="${TETHER_NODE_KEY:-}"
if [ -n "$key" ] && [ -f "$key" ] && [ -n "$(find "$key" -maxdepth 0 -perm /077)" ]; then
  private="${TETHER_STATE_DIR:-tether-state}/.node.key"
  mkdir -p "$(dirname "$private")"
  (umask 077 && cp "$key" "$private.tmp" && chmod 600 "$private.tmp" && mv -f "$private.tmp" "$private")
  TETHER_NODE_KEY="$private"
  export TETHER_NODE_KEY
  echo "tether-entrypoint: node key $key is group/other-readable; using an owner-only copy" >&2
fi

exec tether sidecar "$@"
