# Verge — one-command set-up. `make demo` and `make test` install into .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo demo-deps image image-stream test lint bench bench-zipf bench-purge bench-dns bench-tls bench-compute bench-stream bench-latency conformance demo-regions clean system-deps waf-deps functions

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,analysis]'
	touch $(STAMP)

install: $(STAMP)
	bash scripts/vendor-web.sh
	bash scripts/build-native.sh $(BIN)/python
	$(BIN)/python -c "from verge.compat import wasmtime as w; w.shim()"  # edge functions' C shim (optional: no gcc, no shim)

# What the tests drive: curl, zstd, gzip, headless Chromium (dashboard), PostgreSQL (store
# tests), npm (vendoring uPlot for the dashboard and hls.js for the player), dig (DNS router), openssl (TLS),
# ffmpeg/ffprobe (streaming). Installed from apt only when missing; COMMAND:PACKAGE pairs.
SYSTEM_TOOLS := curl:curl zstd:zstd gzip:gzip npm:npm dig:dnsutils openssl:openssl \
                ffmpeg:ffmpeg ffprobe:ffmpeg ip:iproute2 chromedriver:chromium-driver chromium:chromium \
                clang-14:clang-14 wasm-ld-14:lld-14
# Files that packages provide without a command: wasi-libc and the wasm32 builtins (edge
# functions in C are compiled at test time with clang --target=wasm32-wasi).
SYSTEM_FILES := /usr/lib/wasm32-wasi/libc.a:wasi-libc \
                /usr/lib/llvm-14/lib/clang/14.0.6/lib/wasi/libclang_rt.builtins-wasm32.a:libclang-rt-14-dev-wasm32
system-deps:
	@bash scripts/system-deps.sh $(SYSTEM_TOOLS) $(SYSTEM_FILES) postgresql

# The example edge functions (examples/functions/*.c, see its README) -> FN_OUT/*.wasm, with
# the flags the tests use (tests/compute/conftest.py). Needs the toolchain of `system-deps`.
FN_DIR  := examples/functions
FN_OUT  ?= $(FN_DIR)/build
CLANG   ?= $(shell for c in clang-14 clang clang-16 clang-19; do command -v $$c && break; done)
WASM_CFLAGS := --target=wasm32-wasi -O2 -Wl,--strip-all
functions: $(patsubst $(FN_DIR)/%.c,$(FN_OUT)/%.wasm,$(wildcard $(FN_DIR)/*.c))

$(FN_OUT)/%.wasm: $(FN_DIR)/%.c $(FN_DIR)/verge.h
	@test -n "$(CLANG)" || { echo "clang not found: apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 (or make system-deps)"; exit 1; }
	@mkdir -p $(@D)
	$(CLANG) $(WASM_CFLAGS) -I$(FN_DIR) $< -o $@

# What `verge up` needs: ffmpeg for the stream server's transcoder, curl for the banner's examples,
# npm to vendor hls.js for the player page (scripts/vendor-web.sh).
DEMO_TOOLS := ffmpeg:ffmpeg ffprobe:ffmpeg curl:curl npm:npm
demo-deps:
	@bash scripts/system-deps.sh $(DEMO_TOOLS)

# The WAF's rule set (OWASP CRS from Debian) and, where no wheel fits, its engine.
waf-deps: install
	@bash scripts/waf-deps.sh $(BIN)/python

demo: demo-deps install waf-deps
	$(BIN)/verge up

test: system-deps install waf-deps
	$(BIN)/ruff check verge tests bench
	$(BIN)/python -m pytest -p no:cacheprovider -n 2  # two workers: 16 min instead of 26 on 2 cores

lint: install
	$(BIN)/ruff check verge tests bench

bench: install
	bash bench/setup.sh
	$(BIN)/python bench/run.py
	$(BIN)/python bench/zipf_hit_ratio.py

bench-purge: install
	$(BIN)/python bench/purge_bench.py

bench-dns: install
	$(BIN)/python bench/dns_bench.py

bench-tls: install
	$(BIN)/python bench/tls_bench.py

bench-compute: install
	bash bench/setup.sh
	$(BIN)/python bench/compute_bench.py
	$(BIN)/python bench/kv_bench.py

bench-stream: install
	$(BIN)/python bench/stream_bench.py

# Glass-to-glass latency in headless Chromium (LL-HLS through an edge, and WebRTC/WHEP).
bench-latency: install
	$(BIN)/python bench/latency_bench.py --mode both --seconds 30
	$(BIN)/python bench/webrtc_viewers.py

# Three regions in network namespaces with user-space delays; needs root (ip netns).
demo-regions: install
	$(BIN)/python -m verge.demo.regions

conformance: install
	bash bench/conformance/run.sh

bench-zipf: install
	$(BIN)/python bench/zipf_hit_ratio.py

# The container image with podman (Containerfile); no registry needed: a Debian base is
# debootstrapped once and cached in ~/.cache/verge-image/ (scripts/build-image.sh; needs root).
image:
	bash scripts/build-image.sh

image-stream:
	bash scripts/build-image.sh --with-ffmpeg

clean:
	rm -rf $(VENV) .demo .pytest_cache *.egg-info
