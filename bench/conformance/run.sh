#!/usr/bin/env bash
# Run the HTTP cache test suite of cache-tests.fyi against Verge, nginx, Varnish and ATS.
#
# Installs what is missing, outside this repository: the suite from npm (package
# http-cache-tests, pinned) into $CACHE_TESTS_ROOT (default /tmp/cache-tests), and, when
# run as root on Debian, nginx-light, varnish and trafficserver with apt-get. Then runs
# run.py, which prints the side-by-side counts and writes JSON into results/.
# Arguments are passed to run.py (e.g. --only verge nginx).
#
# Without the npm registry nothing else is fetched: the script says what is missing and
# exits 2.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="${CACHE_TESTS_ROOT:-/tmp/cache-tests}"
suite_pkg="http-cache-tests@0.4.5"
python="${PYTHON:-$repo/.venv/bin/python}"

missing=()
for tool in node npm; do
    command -v "$tool" >/dev/null || missing+=("$tool (Debian: nodejs npm)")
done
if ((${#missing[@]})); then
    echo "run.sh: missing: ${missing[*]}" >&2
    exit 2
fi

if [ ! -f "$root/node_modules/http-cache-tests/cli.mjs" ]; then
    echo "run.sh: installing $suite_pkg from npm into $root"
    mkdir -p "$root"
    if ! (cd "$root" && npm install --no-audit --no-fund --no-save "$suite_pkg" >"$root/npm-install.log" 2>&1); then
        echo "run.sh: missing: npm package $suite_pkg could not be installed (log: $root/npm-install.log)" >&2
        tail -5 "$root/npm-install.log" >&2
        exit 2
    fi
fi

apt_need=()
command -v nginx >/dev/null || apt_need+=(nginx-light)
command -v varnishd >/dev/null || apt_need+=(varnish)
command -v traffic_server >/dev/null || apt_need+=(trafficserver)
if ((${#apt_need[@]})); then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "run.sh: apt-get install ${apt_need[*]}"
        apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${apt_need[@]}" \
            || echo "run.sh: could not install ${apt_need[*]}; those caches are skipped" >&2
    else
        echo "run.sh: not installed (skipped): ${apt_need[*]}" >&2
    fi
fi

exec "$python" "$here/run.py" --suite-root "$root" "$@"
