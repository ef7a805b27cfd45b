#!/usr/bin/env bash
# Build Verge's container image (Containerfile) with podman on a machine that has no container
# registry: the base image is a Debian bookworm root filesystem made with debootstrap from the
# apt mirror this machine already uses, imported with `podman import` and cached.
#
#   scripts/build-image.sh [--tag IMAGE] [--with-ffmpeg] [--base IMAGE] [--rebuild-base]
#
#   --tag IMAGE      what to call the image (default: localhost/verge:VERSION, also :latest)
#   --with-ffmpeg    add Debian's ffmpeg (what `verge stream` needs; ~500 MB more);
#                    tagged localhost/verge:VERSION-stream and :stream
#   --base IMAGE     use this base instead (e.g. python:3.11-slim where a registry is reachable)
#   --rebuild-base   make the debootstrap root filesystem again (e.g. for security updates)
#
# Where a registry is reachable the script is not needed: `podman build -f Containerfile .`
# (or docker build) starts FROM python:3.11-slim, the Containerfile's default BASE_IMAGE.
#
# What it does, each step skipped when its result is already there:
#   1. installs podman, runc and debootstrap with apt-get when missing (and says so);
#   2. vendors the web pages' browser libraries (scripts/vendor-web.sh, npm) so the image's
#      dashboard has its plots and the player page hls.js;
#   3. debootstraps Debian bookworm (minbase + python3, python3-venv, ca-certificates,
#      netbase; then bookworm-updates and -security applied) into a tarball cached in
#      ${VERGE_IMAGE_CACHE:-~/.cache/verge-image}/, and imports it as localhost/verge-base:TAG;
#   4. podman build --isolation chroot --format docker (docker format keeps HEALTHCHECK).
# The native HTTP/2 engine (scripts/build-native.sh, Rust) is not built into the image:
# `--h2-engine native` is opt-in and the image runs the Python engine.
# Environment: VERGE_APT_MIRROR overrides the mirror found in /etc/apt/sources.list*;
# PODMAN_BUILD_FLAGS adds flags to `podman build`; the CA bundle in PIP_CERT (default: the
# system's) reaches pip in the builder as a build secret (for egress proxies with their own CA;
# not kept in the image). Needs root (debootstrap, rootful podman).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VERGE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/verge-image}"
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates,netbase
# Bump RECIPE when the steps that make the root filesystem change: a new cache entry is made.
RECIPE=1

tag="" with_ffmpeg=false base="" rebuild_base=false
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --with-ffmpeg) with_ffmpeg=true; shift ;;
        --base) base="$2"; shift 2 ;;
        --rebuild-base) rebuild_base=true; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "build-image: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# -- 1. tools ------------------------------------------------------------------------------

install_tools() {
    local missing=() pair
    for pair in podman:podman runc:runc debootstrap:debootstrap; do
        [ -n "$base" ] && [ "${pair%%:*}" = debootstrap ] && continue
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    say "installing with apt-get: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# -- 3. the base image -----------------------------------------------------------------------

apt_mirror() {  # the first Debian mirror in this machine's apt sources
    if [ -n "${VERGE_APT_MIRROR:-}" ]; then echo "$VERGE_APT_MIRROR"; return; fi
    local found
    found="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '/^URIs:/ {print $2} /^deb / {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
        | grep -v -e security -e nodesource -e google | grep '/debian' | head -n1)" || true
    echo "${found:-http://deb.debian.org/debian}"
}

make_rootfs() {  # TARBALL: debootstrap into a temporary directory, then tar it
    local tarball="$1" mirror dir
    mirror="$(apt_mirror)"
    dir="$(mktemp -d /var/tmp/verge-rootfs.XXXXXX)"
    # shellcheck disable=SC2064
    trap "umount '$dir/proc' 2>/dev/null || true; rm -rf '$dir'" EXIT
    say "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $mirror (a few minutes, once)"
    as_root debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$dir" "$mirror" >/dev/null
    {
        echo "deb $mirror $SUITE main"
        echo "deb $mirror $SUITE-updates main"
        echo "deb ${mirror%/debian}/debian-security $SUITE-security main"
    } > "$dir/etc/apt/sources.list"
    say "applying $SUITE-updates and $SUITE-security"
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    mount -t proc proc "$dir/proc"
    chroot "$dir" apt-get update -qq
    chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >/dev/null
    chroot "$dir" apt-get clean
    umount "$dir/proc"
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/usr/share/doc/* \
        "$dir"/usr/share/man/* "$dir"/var/log/*.log "$dir"/etc/resolv.conf
    : > "$dir/etc/resolv.conf"
    mkdir -p "$(dirname "$tarball")"
    tar -C "$dir" --numeric-owner -cf "$tarball.tmp" .
    mv -f "$tarball.tmp" "$tarball"  # never a half-written cache entry
    rm -rf "$dir"
    trap - EXIT
    say "cached $tarball ($(du -h "$tarball" | cut -f1))"
}

local_base() {  # prints the imported base image's name; makes it when missing
    local key name tarball
    key="$SUITE-r$RECIPE-$(echo "$BASE_PACKAGES" | md5sum | cut -c1-8)"
    name="localhost/verge-base:$key"
    tarball="$CACHE/debian-$key.tar"
    if $rebuild_base; then
        rm -f "$tarball"
        podman rmi -f "$name" >/dev/null 2>&1 || true
    fi
    if podman image exists "$name"; then
        say "base image $name (cached)"
    else
        [ -s "$tarball" ] || make_rootfs "$tarball"
        say "podman import $tarball as $name"
        podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
            "$tarball" "$name" >/dev/null
    fi
    echo "$name"
}

# -- main ----------------------------------------------------------------------------------

if [ "$(id -u)" -ne 0 ] && [ -z "$base" ]; then
    say "needs root (debootstrap, rootful podman); or pass --base IMAGE from a registry"
    exit 1
fi
install_tools
bash "$ROOT/scripts/vendor-web.sh"
[ -n "$base" ] || base="$(local_base)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n1)"
if [ -n "$tag" ]; then
    names=("$tag")
elif $with_ffmpeg; then
    names=("localhost/verge:$version-stream" localhost/verge:stream)
else
    names=("localhost/verge:$version" localhost/verge:latest)
fi
tags=()
for name in "${names[@]}"; do tags+=(-t "$name"); done
secrets=()
ca_bundle="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
[ -s "$ca_bundle" ] && secrets=(--secret "id=ca_bundle,src=$ca_bundle")
say "podman build FROM $base -> ${names[*]}"
# shellcheck disable=SC2086
podman build --isolation chroot --format docker --layers "${secrets[@]}" \
    --build-arg "BASE_IMAGE=$base" --build-arg "WITH_FFMPEG=$with_ffmpeg" \
    ${PODMAN_BUILD_FLAGS:-} "${tags[@]}" -f "$ROOT/Containerfile" "$ROOT"
say "done: ${names[*]}"
