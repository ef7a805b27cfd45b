#!/usr/bin/env bash
# Vendor the browser libraries of our web pages at build time; the files are not committed.
#
#   uplot@1   uPlot.iife.min.js, uPlot.min.css -> verge/control/web/static/vendor/  (dashboard plots)
#   hls.js@1  hls.min.js                       -> verge/stream/web/vendor/          (player page)
#
# Idempotent: a package whose files are all there already is skipped (no network). Set FORCE=1
# to fetch again; UPLOT_VERSION / HLSJS_VERSION pick other versions. Needs `npm` (the npm
# registry); without npm it only warns: the dashboard shows numbers without plots, and the
# player page falls back to the browser's own HLS (Safari) or says what to run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

have_all() {  # DEST FILE...
  local dest="$1" f
  shift
  for f in "$@"; do [ -s "$dest/$f" ] || return 1; done
}

# vendor NAME SPEC DEST FILE...: copy package/dist/FILE of the npm package SPEC into DEST
vendor() {
  local name="$1" spec="$2" dest="$3" tmp tarball f
  shift 3
  if [ "${FORCE:-0}" != 1 ] && have_all "$dest" "$@"; then
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "vendor-web: warning: npm not found, $name not vendored (apt-get install npm," \
         "then run this script again)" >&2
    return 0
  fi
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack "$spec" --silent >/dev/null)
  tarball="$(ls "$tmp"/*.tgz)"
  tar -xzf "$tarball" -C "$tmp" package/dist
  mkdir -p "$dest"
  for f in "$@"; do
    # temp file + rename: a half-copied file is never left in place
    cp "$tmp/package/dist/$f" "$dest/.$f.tmp"
    mv -f "$dest/.$f.tmp" "$dest/$f"
  done
  echo "vendor-web: $(basename "$tarball" .tgz) -> ${dest#"$ROOT"/}"
  rm -rf "$tmp"
}

vendor uPlot "uplot@${UPLOT_VERSION:-1}" "$ROOT/verge/control/web/static/vendor" \
  uPlot.iife.min.js uPlot.min.css
vendor hls.js "hls.js@${HLSJS_VERSION:-1}" "$ROOT/verge/stream/web/vendor" \
  hls.min.js
