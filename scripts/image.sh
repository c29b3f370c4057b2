#!/usr/bin/env bash
# Build and describe the container image without a Docker daemon (buildah, chroot isolation).
#   scripts/image.sh build    - `make image`: base image, deploy/Dockerfile, size report, SBOM
#   scripts/image.sh report   - size of the image and what takes the room
#   scripts/image.sh sbom     - CycloneDX SBOM of the image's venv -> build/image/sbom.cdx.json
# Environment: IMAGE (default localhost/revoke-relay:dev); BASE_IMAGE=<ref> to build on that base,
# BASE_IMAGE=standin to skip trying the default base; REFRESH_BASE=1 to rebuild the cached stand-in.
# Runs as root on Debian (apt installs buildah/mmdebstrap when missing; buildah needs root here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGE="${IMAGE:-localhost/revoke-relay:dev}"
OUT="$ROOT/build/image"              # reports and SBOM of the last build (gitignored)
CACHE="$ROOT/build/image-cache"      # the stand-in base tarball, kept between runs (gitignored)
TOOLS="$ROOT/.tools/sbom-venv"
PY="${PY:-python3}"
# The stand-in base is rebuilt after this many days so Debian security updates reach the image.
BASE_MAX_AGE_DAYS="${BASE_MAX_AGE_DAYS:-7}"
# What the stand-in holds: the interpreter with venv/ensurepip (the builder stage makes the venv),
# CA certificates (amqps://), useradd (passwd) and apt, as in the official slim image.
STANDIN_PACKAGES="apt usr-is-merged python3 python3-venv python-is-python3 ca-certificates passwd"
SBOM_PINS=("cyclonedx-bom==7.5.0" "cyclonedx-python-lib==11.12.0")
ISOLATION=(--isolation chroot --network host)

say() { printf 'image: %s\n' "$*"; }
die() { printf 'image: ERROR: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

apt_install() {
  local missing=() pkg
  for pkg in "$@"; do have "$pkg" || missing+=("$pkg"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! have apt-get; then
    die "${missing[*]} missing: run as root on Debian, or apt-get install ${missing[*]}"
  fi
  say "installing ${missing[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

exists_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# The FROM default in deploy/Dockerfile, with the registry spelled out: buildah resolves no short
# names without a search registry, and docker.io/library/ is what Docker would have used.
default_base() {
  local ref
  ref="$(sed -n 's/^ARG BASE_IMAGE=//p' deploy/Dockerfile | head -1)"
  [ -n "$ref" ] || die "deploy/Dockerfile has no ARG BASE_IMAGE=<default>"
  if [[ "$ref" != */* ]]; then
    printf 'docker.io/library/%s\n' "$ref"
  elif [[ "${ref%%/*}" == *.* || "${ref%%/*}" == *:* || "${ref%%/*}" == localhost ]]; then
    printf '%s\n' "$ref"                      # the first part names a registry
  else
    printf 'docker.io/%s\n' "$ref"
  fi
}

# --- the stand-in base: Debian bookworm's own python3 (3.11), built with mmdebstrap ---------------
standin_tarball() {
  local key tar
  # The tarball's name carries a hash of what goes into it, so a change here rebuilds it.
  key="$(printf '%s\n' "$STANDIN_PACKAGES" "$(declare -f build_standin_tarball)" | sha256sum | cut -c1-12)"
  tar="$CACHE/bookworm-python3-$key.tar"
  if [ -f "$tar" ] && [ -z "${REFRESH_BASE:-}" ] && [ -n "$(find "$tar" -mtime "-$BASE_MAX_AGE_DAYS")" ]; then
    say "stand-in base: cached $tar ($(du -m "$tar" | cut -f1) MB, $(( ($(date +%s) - $(stat -c %Y "$tar")) / 3600 )) h old)" >&2
  else
    build_standin_tarball "$tar" >&2
  fi
  printf '%s\n' "$tar"
}

build_standin_tarball() {
  local tar="$1" t0 log
  apt_install mmdebstrap
  mkdir -p "$CACHE"
  rm -f "$CACHE"/bookworm-python3-*.tar
  t0="$(now)"
  log="$CACHE/mmdebstrap.log"
  say "stand-in base: mmdebstrap bookworm + ${STANDIN_PACKAGES// /, } (about a minute; log: $log)"
  # Slim like the official image: no docs (copyright files stay), man pages, info or locales.
  # Debian resolves init-system-helpers' "usrmerge | usr-is-merged" to usrmerge, which drags in
  # perl (50 MB); the tree is merged already, so keep usr-is-merged and autoremove the rest.
  # $1 is the chroot, for mmdebstrap to fill in.
  # shellcheck disable=SC2016
  local hook='chroot "$1" sh -ec "apt-mark auto \$(apt-mark showmanual) >/dev/null; apt-mark manual '"$STANDIN_PACKAGES"' >/dev/null; apt-get purge -y -qq usrmerge; apt-get autoremove --purge -y -qq -o APT::AutoRemove::RecommendsImportant=false -o APT::AutoRemove::SuggestsImportant=false"'
  if ! mmdebstrap --variant=apt --format=tar --include="${STANDIN_PACKAGES// /,}" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --customize-hook="$hook" \
      bookworm "$tar.tmp" > "$log" 2>&1; then
    tail -20 "$log" >&2
    rm -f "$tar.tmp"
    die "mmdebstrap failed (log: $log)"
  fi
  mv "$tar.tmp" "$tar"
  say "stand-in base: $tar ($(du -m "$tar" | cut -f1) MB) in $(since "$t0") s"
}

# Import the tarball as an image (once per tarball: the tag carries its hash).
standin_image() {
  local tar="$1" sum ref ctr
  sum="$(sha256sum "$tar" | cut -c1-12)"
  ref="localhost/revoke-relay-base:bookworm-$sum"
  if exists_image "$ref"; then
    printf '%s\n' "$ref"
    return 0
  fi
  say "stand-in base: importing as $ref" >&2
  ctr="$(buildah from --quiet scratch)"
  buildah add --quiet "$ctr" "$tar" / >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd '["python3"]' --created-by "mmdebstrap bookworm: $STANDIN_PACKAGES" \
    --label org.opencontainers.image.title=revoke-relay-base \
    --label "org.opencontainers.image.description=Debian bookworm python3 (3.11) from Debian packages; stand-in for python:3.11-slim-bookworm" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
  # Earlier stand-ins (a refreshed tarball has a new hash) are no longer built on.
  buildah images --noheading --format '{{.Name}}:{{.Tag}}' --filter reference=localhost/revoke-relay-base \
    | grep -vxF "$ref" | xargs -r buildah rmi >/dev/null || true
  printf '%s\n' "$ref"
}

# Print the base image reference to build on, saying which one and why.
choose_base() {
  local want="${BASE_IMAGE:-}" ref t0
  if [ -n "$want" ] && [ "$want" != standin ]; then
    say "base: $want (BASE_IMAGE)" >&2
    printf '%s\n' "$want"
    return 0
  fi
  if [ -z "$want" ]; then
    ref="$(default_base)"
    t0="$(now)"
    if exists_image "$ref" || timeout 120 buildah pull --quiet "$ref" >/dev/null 2>"$OUT/pull.log"; then
      say "base: $ref (the Dockerfile's default)" >&2
      printf '%s\n' "$ref"
      return 0
    fi
    say "base: cannot pull $ref ($(tail -1 "$OUT/pull.log" | cut -c1-160); $(since "$t0") s)" >&2
  fi
  say "base: building on a STAND-IN from Debian packages: Debian's python3 3.11 instead of the" >&2
  say "      python.org build of the official image (docs/deploy.md#container-image)" >&2
  standin_image "$(standin_tarball)"
}

# --- the machine's pip configuration, lent to the build as secrets (never baked into the image) ---
# pip in the builder must reach the package index the way pip on this machine does: the same
# index/proxy settings and the same CA bundle (a TLS-inspecting proxy's CA is not in Debian's).
# Merge every pip configuration file and PIP_* variable into one file with pip's precedence and
# hand it to the build as the secret `pip.conf`, the CA bundle it names as the secret `pip-ca.pem`;
# deploy/Dockerfile mounts both for its one pip step only. Settings that name other local paths
# (constraint files, find-links directories, file:// indexes) are left out: a secret is one file.
# Prints the CA bundle's path on stdout (nothing if pip has no `cert`).
pip_secrets() {
  local conf="$1"
  "$PY" - "$conf" <<'PY'
import configparser, os, sys

home = os.path.expanduser("~")
xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
files = ["/etc/pip.conf"] + [os.path.join(d, "pip", "pip.conf") for d in reversed(xdg_dirs)]
files += [os.path.join(home, ".pip", "pip.conf"),
          os.path.join(os.environ.get("XDG_CONFIG_HOME", os.path.join(home, ".config")), "pip", "pip.conf")]
if os.environ.get("PIP_CONFIG_FILE"):
    files.append(os.environ["PIP_CONFIG_FILE"])
merged: dict[str, dict[str, str]] = {}
used = [f for f in dict.fromkeys(files) if os.path.isfile(f)]
for f in used:  # later files override earlier ones, as in pip
    part = configparser.RawConfigParser()
    part.read(f)
    for section in part.sections():
        for key, value in part.items(section):
            merged.setdefault(section, {})[key.replace("_", "-")] = value
env = {k[4:].lower().replace("_", "-"): v for k, v in os.environ.items()
       if k.startswith("PIP_") and k != "PIP_CONFIG_FILE"}
merged.setdefault("global", {}).update(env)  # PIP_* variables override the files

def local(word: str) -> bool:
    return word.startswith("file:") or os.path.isabs(word)

ca, dropped = None, []
for section, values in merged.items():
    for key, value in list(values.items()):
        if key == "cert":
            ca = value
            values[key] = "/run/secrets/pip-ca.pem"
        elif key == "client-cert" or any(local(w) for w in value.split()):
            kept = [w for w in value.split() if not local(w)]
            dropped.append(f"{section}.{key}")
            if kept and key != "client-cert":
                values[key] = " ".join(kept)
            else:
                del values[key]
out = configparser.RawConfigParser()
for section, values in merged.items():
    if values:
        out[section] = values
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as fh:
    out.write(fh)
print("image: pip configuration from " + (", ".join(used) or "no file") + (" and PIP_* variables" if env else ""), file=sys.stderr)
if dropped:
    print("image: left out (local paths, not lent to the build): " + ", ".join(sorted(set(dropped))), file=sys.stderr)
if ca and os.path.isfile(ca):
    print(ca)
PY
}

# --- build -------------------------------------------------------------------------------------
cmd_build() {
  local t0 tb base ca secrets=()
  t0="$(now)"
  apt_install buildah
  mkdir -p "$OUT"
  base="$(choose_base)"
  PIP_SECRET="$(mktemp "$OUT/pip.conf.XXXXXX")"
  trap 'rm -f "$PIP_SECRET"' EXIT
  ca="$(pip_secrets "$PIP_SECRET")"
  secrets=(--secret "id=pip.conf,src=$PIP_SECRET")
  [ -z "$ca" ] || secrets+=(--secret "id=pip-ca.pem,src=$ca")
  say "lent to the build's pip step as secrets: the merged pip.conf${ca:+ and the CA bundle $ca}"
  tb="$(now)"
  # --layers: unchanged steps come from the cache; --format docker keeps the HEALTHCHECK (the OCI
  # image config has no field for it).
  buildah bud "${ISOLATION[@]}" --layers --format docker \
    --ignorefile deploy/Dockerfile.dockerignore -f deploy/Dockerfile \
    --build-arg "BASE_IMAGE=$base" "${secrets[@]}" \
    --label "org.opencontainers.image.base.name=$base" \
    --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . 2>&1 | sed -u 's/^/  | /' | tee "$OUT/build.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "buildah bud failed"
  rm -f "$PIP_SECRET"
  say "built $IMAGE on $base in $(since "$tb") s"
  prune_stale
  printf '%s\n' "$base" > "$OUT/base.txt"
  cmd_report
  cmd_sbom
  say "make image: done in $(since "$t0") s"
}

# --layers keeps each step's image as the next build's cache; each build that changes the code
# leaves the previous ones untagged. Remove the untagged images of this Dockerfile (their history
# has /opt/venv) that this build did not use, so repeated builds do not fill the disk.
prune_stale() {
  local used id removed=0
  used="$(grep -oE -- '--> (Using cache )?[0-9a-f]{11,64}' "$OUT/build.log" | grep -oE '[0-9a-f]{11,64}$' || true)"
  while read -r id; do
    id="${id#sha256:}"
    [ -n "$id" ] || continue
    if grep -q "^${id:0:11}" <<< "$used"; then continue; fi
    if buildah inspect --type image --format '{{range .Docker.History}}{{.CreatedBy}}{{end}}' "$id" 2>/dev/null \
        | grep -q '/opt/venv' && buildah rmi "$id" >/dev/null 2>&1; then
      removed=$((removed + 1))
    fi
  done < <(buildah images --filter dangling=true --noheading --no-trunc --format '{{.ID}}')
  [ "$removed" -eq 0 ] || say "removed $removed stale untagged images of earlier builds"
}

# --- size report -------------------------------------------------------------------------------
# Run "$@" with the image's root filesystem mounted at $mnt (a throwaway working container).
with_image_mounted() {
  local ctr rc=0
  exists_image "$IMAGE" || die "no image $IMAGE: run make image"
  ctr="$(buildah from --quiet --pull=false "$IMAGE")"
  mnt="$(buildah mount "$ctr")"
  "$@" || rc=$?
  buildah umount "$ctr" >/dev/null
  buildah rm "$ctr" >/dev/null
  return "$rc"
}

cmd_report() { with_image_mounted report; }

report() {
  {
    "$PY" - "$IMAGE" "$(cat "$OUT/base.txt" 2>/dev/null || echo unknown)" <<'PY'
import json, subprocess, sys
image, base = sys.argv[1], sys.argv[2]
info = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", image], check=True, capture_output=True).stdout)
root = json.loads(subprocess.run(["buildah", "info"], check=True, capture_output=True).stdout)["store"]["GraphRoot"]
sizes = {l["diff-digest"]: l.get("diff-size", 0) for l in json.load(open(f"{root}/overlay-layers/layers.json")) if "diff-digest" in l}
docker = info["Docker"]
layers = docker["rootfs"]["diff_ids"]
steps = [h.get("created_by", "") for h in docker["history"] if not h.get("empty_layer")]
total = sum(sizes.get(d, 0) for d in layers)
print(f"image: {image} ({info['FromImageID'][:12]}), {total / 1e6:.0f} MB uncompressed in {len(layers)} layers")
print(f"base: {base}")
print(f"user: {docker['config'].get('User')}, entrypoint {docker['config'].get('Entrypoint')} {docker['config'].get('Cmd')}")
print("layers (MB, oldest first):")
for digest, step in zip(layers, steps):
    step = step.removeprefix("/bin/sh -c ").removeprefix("#(nop) ")
    print(f"  {sizes.get(digest, 0) / 1e6:6.1f}  {step[:100]}")
PY
    # What a registry push or pull moves: the layers gzip-compressed, as `buildah push` writes them.
    buildah push --quiet "$IMAGE" "oci-archive:$OUT/push.tar" >/dev/null
    echo "compressed (gzip layers, as pushed): $(du -k "$OUT/push.tar" | awk '{ printf "%.1f", $1 / 1024 }') MB"
    rm -f "$OUT/push.tar"
    echo "python: $(chroot "$mnt" /opt/venv/bin/python -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    echo "what takes the room (MB):"
    du -xsk "$mnt/usr/lib/x86_64-linux-gnu" "$mnt/usr/lib/python3.11" "$mnt/usr/local/lib/python3.11" \
      "$mnt/usr/share" "$mnt/usr/bin" "$mnt/usr/sbin" "$mnt/var/lib" "$mnt/opt/venv" 2>/dev/null \
      | sed "s|$mnt/*|/|" | sort -rn | awk '{ printf "  %6.1f %s\n", $1 / 1024, $2 }'
    echo "  of $(du -xsk "$mnt" | awk '{ printf "%.1f", $1 / 1024 }') MB in the root filesystem"
    echo "the venv's largest packages (MB):"
    du -sk "$mnt"/opt/venv/lib/python3.11/site-packages/* | sort -rn | head -8 \
      | sed "s|$mnt/opt/venv/lib/python3.11/site-packages/||" | awk '{ printf "  %6.1f %s\n", $1 / 1024, $2 }'
    echo "largest Debian packages (installed size, MB):"
    # shellcheck disable=SC2016 # dpkg-query's own ${field} syntax
    chroot "$mnt" dpkg-query -W -f '${Installed-Size} ${Package}\n' 2>/dev/null \
      | sort -rn | head -8 | awk '{ printf "  %6.1f %s\n", $1 / 1024, $2 }'
  } | tee "$OUT/size.txt"
  # shellcheck disable=SC2016 # dpkg-query's own ${field} syntax
  chroot "$mnt" dpkg-query -W -f '${Package} ${Version}\n' > "$OUT/debian-packages.txt" 2>/dev/null || true
}

# --- SBOM --------------------------------------------------------------------------------------
ensure_sbom_tool() {
  local want
  want="$(printf '%s\n' "${SBOM_PINS[@]}")"
  if [ -x "$TOOLS/bin/cyclonedx-py" ] && [ "$(cat "$TOOLS/.installed" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  say "installing ${SBOM_PINS[*]} into $TOOLS"
  rm -rf "$TOOLS"
  mkdir -p "$(dirname "$TOOLS")"
  "$PY" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -qq --disable-pip-version-check "${SBOM_PINS[@]}"
  printf '%s\n' "$want" > "$TOOLS/.installed"
}

cmd_sbom() {
  ensure_sbom_tool
  with_image_mounted sbom
}

sbom() {
  local shim
  # cyclonedx-py asks the environment's interpreter for sys.path, then reads the distributions'
  # metadata there. Let the image's own interpreter answer (chroot into the mounted image), with
  # each entry seen from the host.
  shim="$OUT/image-python"
  cat > "$shim" <<SH
#!/bin/sh
exec chroot '$mnt' /opt/venv/bin/python -c 'import json, sys; json.dump(["$mnt" + p for p in sys.path if p], sys.stdout)'
SH
  chmod +x "$shim"
  "$TOOLS/bin/cyclonedx-py" environment --pyproject pyproject.toml --mc-type application \
    --output-reproducible --of JSON -o "$OUT/sbom.cdx.json" "$shim"
  rm -f "$shim"
  "$PY" - "$OUT/sbom.cdx.json" <<'PY'
import json, sys
bom = json.load(open(sys.argv[1]))
names = sorted(f"{c['name']}=={c.get('version', '?')}" for c in bom.get("components", []))
print(f"image: SBOM {sys.argv[1]}: CycloneDX {bom['specVersion']}, {len(names)} Python components: {' '.join(names)}")
PY
}

case "${1:-}" in
  build) cmd_build ;;
  report) mkdir -p "$OUT"; cmd_report ;;
  sbom) mkdir -p "$OUT"; cmd_sbom ;;
  *) echo "usage: $0 build|report|sbom" >&2; exit 2 ;;
esac
