#!/usr/bin/env bash
# Install what bench/run.py needs and a fresh Debian 12 lacks: nginx (via nginx-light), wrk,
# and taskset (util-linux). Does nothing when all three are already there.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)

if ((${#need[@]} == 0)); then
    echo "bench/setup.sh: nginx, wrk and taskset are installed"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
fi
echo "bench/setup.sh: installing ${need[*]}"
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
