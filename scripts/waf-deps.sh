#!/usr/bin/env bash
# Install what the WAF (verge/protect/waf.py) needs from Debian, only when it is missing.
#
#   scripts/waf-deps.sh [PYTHON]      (default: .venv/bin/python, else python3)
#
# - The OWASP Core Rule Set: Debian's modsecurity-crs (3.3.4 on bookworm), rules under
#   /usr/share/modsecurity-crs/rules.
# - The engine: libmodsecurity 3.0.15 comes with the `libmodsecurity` wheel (pip, pinned in
#   pyproject.toml; manylinux x86_64 and macOS arm64). Where PYTHON cannot find it (no
#   wheel for this machine), Debian's libmodsecurity3 (3.0.9: blocks the same, but reports
#   no rule ids) is installed instead.
# Nothing is installed, and the network is not touched, when both are there. Run it after
# the Python packages are installed (`make install`), so the wheel is seen.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CRS_RULES=/usr/share/modsecurity-crs/rules/REQUEST-901-INITIALIZATION.conf

missing=""
[ -e "$CRS_RULES" ] || missing="$missing modsecurity-crs"

# The library the WAF will load (verge.protect._modsec.find_library: $VERGE_LIBMODSECURITY,
# the wheel, then the system's libmodsecurity.so.3).
if ! (cd "$ROOT" && "$PYTHON" -c 'from verge.protect._modsec import Engine; Engine().close()') \
    >/dev/null 2>&1; then
  missing="$missing libmodsecurity3"
fi

if [ -z "$missing" ]; then
  exit 0
fi

echo "waf-deps: installing from apt:$missing"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || {
    echo "waf-deps: run as root or install sudo, then: apt-get install$missing" >&2
    exit 1
  }
  SUDO=sudo
fi
$SUDO apt-get update -q
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
