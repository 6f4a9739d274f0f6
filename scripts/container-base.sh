#!/usr/bin/env bash
# Prints the name of a base image for sidecar/Dockerfile that Podman holds locally.
#
# The public one ($BASE_IMAGE, python:3.11-slim) when it is present or can be pulled;
# otherwise (no public image registry reachable, as on our CI machines) one made from
# Debian's packages: `debootstrap --variant=minbase` of the current Debian release plus
# python3 and python3-venv, imported with `podman import`. The root file system is
# cached as a tarball under $CACHE_DIR, and the imported image stays in Podman's
# store, so a second run takes seconds. Progress goes to stderr; stdout is the name.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
CACHE_DIR="${CACHE_DIR:-build/container}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${DEBIAN_SUITE:-$(. /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}")}"
SUITE="${SUITE:-bookworm}"
PACKAGES="python3,python3-venv"
LOCAL="localhost/tether-base:${SUITE}"

log() { echo "container-base: $*" >&2; }

if podman image exists "$BASE_IMAGE"; then
  log "using $BASE_IMAGE (present locally)"
  echo "$BASE_IMAGE"
  exit 0
fi
if timeout 60 podman pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  log "using $BASE_IMAGE (pulled)"
  echo "$BASE_IMAGE"
  exit 0
fi
log "$BASE_IMAGE cannot be pulled; using a base made from Debian's packages ($SUITE)"
if podman image exists "$LOCAL"; then
  log "using $LOCAL (present locally)"
  echo "$LOCAL"
  exit 0
fi

tarball="$CACHE_DIR/base-$SUITE-minbase-${PACKAGES//,/-}.tar"
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null \
    || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
  mkdir -p "$CACHE_DIR"
  rootfs="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap --variant=minbase --include=$PACKAGES $SUITE from $MIRROR (a few minutes)"
  start=$(date +%s)
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
      > "$CACHE_DIR/debootstrap.log" 2>&1; then
    tail -n 30 "$CACHE_DIR/debootstrap.log" >&2
    log "debootstrap failed: see $CACHE_DIR/debootstrap.log"
    exit 1
  fi
  # What only the build needed: downloaded packages, package lists, logs.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs"/debootstrap
  tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  log "root file system cached in $tarball ($(( $(date +%s) - start )) s)"
fi
podman import -q \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE" \
  "$tarball" "$LOCAL" >/dev/null
log "imported $LOCAL"
echo "$LOCAL"
