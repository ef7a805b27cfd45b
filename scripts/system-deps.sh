#!/usr/bin/env bash
# Install the Debian packages behind missing system tools, and say what is installed.
#
#   scripts/system-deps.sh COMMAND:PACKAGE ... [/path/to/file:PACKAGE ...] [postgresql]
#
# A COMMAND:PACKAGE pair installs PACKAGE when COMMAND is not on PATH; a pair whose first half
# starts with / installs PACKAGE when that file is missing; the word `postgresql` installs
# PostgreSQL when no initdb is found. Nothing is installed when everything is there (no network).
# `make demo` asks for what `verge up` runs (ffmpeg), `make test` for what the tests drive.
set -euo pipefail

missing=""
for pair in "$@"; do
  if [ "$pair" = postgresql ]; then
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
    continue
  fi
  need="${pair%%:*}" package="${pair#*:}"
  case "$need" in
    /*) [ -e "$need" ] || missing="$missing $package" ;;
    *) command -v "$need" >/dev/null 2>&1 || missing="$missing $package" ;;
  esac
done
[ -z "$missing" ] && exit 0

# one package may stand behind several tools: install each once
packages="$(printf '%s\n' $missing | sort -u | tr '\n' ' ')"
echo "system-deps: installing from apt: $packages"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "system-deps: run as root or install sudo, then: apt-get install $packages" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -q
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $packages
