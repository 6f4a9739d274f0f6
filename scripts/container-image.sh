#!/usr/bin/env bash
# `make image`: the Tether image from sidecar/Dockerfile with Podman, then its SBOM.
#
# The base is the public python:3.11-slim when it can be pulled, else one made from
# Debian's packages (scripts/container-base.sh). HEALTHCHECK needs the Docker image
# format (OCI images have no health check), and RUN steps use the host's network
# (pip fetches the wheel's dependencies from PyPI). The SBOM (CycloneDX JSON) lists
# the Python distributions installed in the image's environment (cyclonedx-py, run in
# a throwaway container from the image) and the Debian packages of its base.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-localhost/tether:0.1.0}"
OUT="${CACHE_DIR:-build/container}"
SBOM="${SBOM:-$OUT/sbom.json}"
CYCLONEDX="cyclonedx-bom==7.5.0"
export CACHE_DIR="$OUT"

log() { echo "image: $*" >&2; }

command -v podman >/dev/null || {
  log "podman is not installed (Debian: apt-get install podman runc; see docs/deploy.md, \"Podman\")"
  exit 1
}
podman info >/dev/null || { log "podman does not work here (podman info failed)"; exit 1; }
mkdir -p "$OUT"

# Behind a TLS-intercepting proxy pip needs the host's CA bundle (PIP_CERT or
# SSL_CERT_FILE): it goes into the RUN steps as a read-only mount of a pip site config
# (/etc/xdg/pip), never into a layer, so the image is the same as built anywhere else.
pip_mount=()
ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [ -n "$ca" ] && [ -r "$ca" ]; then
  rm -rf "$OUT/pip" && mkdir -p "$OUT/pip"
  cp "$ca" "$OUT/pip/ca.crt"
  printf '[global]\ncert = /etc/xdg/pip/ca.crt\n' > "$OUT/pip/pip.conf"
  pip_mount=(-v "$(realpath "$OUT/pip"):/etc/xdg/pip:ro")
  log "pip in the build trusts the host's CA bundle $ca (mounted, not copied)"
fi

start=$(date +%s)
base="$(scripts/container-base.sh)"
log "building $IMAGE from sidecar/Dockerfile on $base"
podman build --format docker --network host --build-arg "BASE_IMAGE=$base" "${pip_mount[@]}" \
  -f sidecar/Dockerfile -t "$IMAGE" . > "$OUT/build.log" 2>&1 || {
  tail -n 40 "$OUT/build.log" >&2
  log "podman build failed: see $OUT/build.log"
  exit 1
}
log "built $IMAGE in $(( $(date +%s) - start )) s ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes; log in $OUT/build.log)"

# The SBOM is worth remaking only when the image changed.
id="$(podman image inspect --format '{{.Id}}' "$IMAGE")"
if [ -s "$SBOM" ] && [ "$(cat "$SBOM.image-id" 2>/dev/null)" = "$id" ]; then
  log "SBOM $SBOM is up to date"
  exit 0
fi
podman run --rm --network host --no-healthcheck --user 0 --entrypoint /bin/sh -v "$(realpath "$OUT"):/out" \
  "${pip_mount[@]}" "$IMAGE" -c "
  set -e
  python3 -m venv /tmp/sbom
  /tmp/sbom/bin/pip install -q --disable-pip-version-check '$CYCLONEDX'
  /tmp/sbom/bin/cyclonedx-py environment --output-format JSON --output-file /out/sbom-python.json /opt/tether/bin/python
  dpkg-query -W -f '\${Package}\t\${Version}\t\${Architecture}\n' > /out/sbom-dpkg.tsv
" > "$OUT/sbom.log" 2>&1 || { tail -n 20 "$OUT/sbom.log" >&2; log "SBOM failed: see $OUT/sbom.log"; exit 1; }
python3 - "$OUT/sbom-python.json" "$OUT/sbom-dpkg.tsv" "$SBOM" "$IMAGE" "$base" <<'PY'
"""Adds the image's Debian packages to cyclonedx-py's SBOM of its Python environment."""
import json, sys
from pathlib import Path
python_sbom, dpkg, out, image, base = sys.argv[1:]
doc = json.loads(Path(python_sbom).read_text())
doc.setdefault("metadata", {})["component"] = {
    "type": "container", "name": image, "bom-ref": image,
    "description": f"Tether image built from sidecar/Dockerfile on {base}",
}
for line in Path(dpkg).read_text().splitlines():
    name, version, arch = line.split("\t")
    purl = f"pkg:deb/debian/{name}@{version}?arch={arch}"
    doc.setdefault("components", []).append(
        {"type": "library", "name": name, "version": version, "purl": purl, "bom-ref": purl}
    )
Path(out).write_text(json.dumps(doc, indent=2) + "\n")
python = sum(1 for c in doc["components"] if not c.get("purl", "").startswith("pkg:deb/"))
print(f"image: SBOM {out}: {python} Python distributions, "
      f"{len(doc['components']) - python} Debian packages", file=sys.stderr)
PY
rm -f "$OUT/sbom-python.json" "$OUT/sbom-dpkg.tsv"
echo "$id" > "$SBOM.image-id"
