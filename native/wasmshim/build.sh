#!/bin/sh
# Build the wasmshim shared library (see wasmshim.c) against the wasmtime wheel's libwasmtime.
#   sh native/wasmshim/build.sh OUT.so LIBWASMTIME_DIR
# verge.compat.wasmtime runs this on first use (into a cache directory); a Makefile may too.
set -eu
out=$1
libdir=$2
here=$(cd "$(dirname "$0")" && pwd)
${CC:-gcc} -O2 -std=c11 -Wall -Wextra -fPIC -shared -pthread \
    -o "$out" "$here/wasmshim.c" \
    -L"$libdir" -l:_libwasmtime.so -Wl,-rpath,"$libdir" -Wl,--no-undefined
