#!/usr/bin/env bash
# Vendor the dashboard's plotting library (uPlot) at build time; the files are not committed.
#
# Copies uPlot.iife.min.js and uPlot.min.css from the npm package `uplot@1` into
# verge/control/web/static/vendor/. Idempotent: when both files are already there it does
# nothing (no network). Set FORCE=1 to fetch again. Needs `npm` (the npm registry); without
# npm it only warns, and the dashboard shows its numbers without plots.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/verge/control/web/static/vendor"
FILES=(uPlot.iife.min.js uPlot.min.css)
VERSION="${UPLOT_VERSION:-1}"

have_all() {
  local f
  for f in "${FILES[@]}"; do [ -s "$DEST/$f" ] || return 1; done
}

if [ "${FORCE:-0}" != 1 ] && have_all; then
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  # Not fatal: the dashboard works without plots and says how to get them.
  echo "vendor-web: warning: npm not found, dashboard plots disabled (apt-get install npm," \
       "then run this script again)" >&2
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack "uplot@$VERSION" --silent >/dev/null)
tar -xzf "$TMP"/uplot-*.tgz -C "$TMP" package/dist
mkdir -p "$DEST"
for f in "${FILES[@]}"; do
  # temp file + rename: a half-copied file is never left in place
  cp "$TMP/package/dist/$f" "$DEST/.$f.tmp"
  mv -f "$DEST/.$f.tmp" "$DEST/$f"
done
echo "vendor-web: uPlot $(basename "$TMP"/uplot-*.tgz .tgz | sed 's/^uplot-//') -> ${DEST#"$ROOT"/}"
