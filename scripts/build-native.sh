#!/usr/bin/env bash
# Build Verge's native HTTPS front (native/h2front) and install it as
# verge/http/_h2front.<abi>.so: the HTTPS engine of `verge edge --https ...` (--h2-engine auto|native).
#
# The crate builds offline from Debian's packaged crates (/usr/share/cargo/registry, see
# native/h2front/.cargo/config.toml): missing librust-*-dev packages are installed with
# apt-get, and cargo/rustc too when no cargo is found (on PATH or in ~/.cargo/bin).
# Usage: scripts/build-native.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRATE="$ROOT/native/h2front"
PYTHON="${1:-}"
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# an absolute path: the build runs from the crate's directory
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"

# The Debian packages whose crates the build needs (they pull in their dependencies).
CRATE_PACKAGES=(librust-pyo3-dev librust-hyper-dev librust-h2-dev librust-tokio-dev
                librust-tokio-rustls-dev librust-rustls-dev librust-bytes-dev librust-libc-dev)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    echo "build-native: installing with apt-get: $*"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
for pkg in "${CRATE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
else
    echo "build-native: crate packages present (${CRATE_PACKAGES[*]})"
fi

export PATH="$PATH:$HOME/.cargo/bin"
if ! command -v cargo >/dev/null; then
    apt_install cargo rustc
fi
echo "build-native: $(cargo --version), python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"

# The crate registry cargo reads (native/h2front/.cargo/config.toml): Debian's, mirrored
# by symlinks into target/registry, except the crates Verge patches
# (native/h2front/patches/<crate>-<version>-*.patch), which are patched copies. A directory
# source like Debian's own, so Cargo.lock does not change and the patched crate builds as
# any dependency does (its lints capped). Remade when a patch or the Debian set changes; a
# patch that does not apply stops the build (the crate changed under it).
DEBIAN_REGISTRY=/usr/share/cargo/registry
command -v patch >/dev/null || apt_install patch
prepare_registry() {
    local registry="$CRATE/target/registry" stamp
    stamp="$( (ls "$DEBIAN_REGISTRY"; cat "$CRATE"/patches/*.patch) | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$registry/.verge-stamp" 2>/dev/null)" = "$stamp" ]; then
        return
    fi
    rm -rf "$registry"
    mkdir -p "$registry"
    for src in "$DEBIAN_REGISTRY"/*/; do
        ln -s "${src%/}" "$registry/$(basename "$src")"
    done
    for p in "$CRATE"/patches/*.patch; do
        local name_version
        name_version="$(basename "$p" | sed -E 's/^(.+-[0-9]+\.[0-9]+\.[0-9]+)-.*\.patch$/\1/')"
        [ -d "$DEBIAN_REGISTRY/$name_version" ] || {
            echo "build-native: $p is for $name_version, which Debian no longer ships" >&2; exit 1; }
        if [ -L "$registry/$name_version" ]; then
            rm "$registry/$name_version"
            cp -r "$DEBIAN_REGISTRY/$name_version" "$registry/$name_version"
        fi
        patch --quiet --forward -p1 -d "$registry/$name_version" < "$p" || {
            echo "build-native: $p does not apply to $name_version" >&2; exit 1; }
        echo "build-native: patched $name_version with $(basename "$p")"
        # cargo does not notice changed files in a directory source: rebuild the crate
        (cd "$CRATE" && cargo clean --release --offline -p "${name_version%-*}" 2>/dev/null) || true
    done
    echo "$stamp" > "$registry/.verge-stamp"
}
prepare_registry

# pyo3 finds the interpreter (and its ABI) through PYO3_PYTHON.
cd "$CRATE"
PYO3_PYTHON="$PYTHON" cargo build --release --offline --locked

SUFFIX="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
TARGET_DIR="${CARGO_TARGET_DIR:-$CRATE/target}"
DEST="$ROOT/verge/http/_h2front$SUFFIX"
install -m 0755 "$TARGET_DIR/release/lib_h2front.so" "$DEST.tmp"
mv -f "$DEST.tmp" "$DEST"
echo "build-native: installed $DEST"
"$PYTHON" -c "import verge.http._h2front as m; print('build-native: import ok', m.__name__)"
