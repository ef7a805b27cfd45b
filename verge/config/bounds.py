"""Bounds: the most that any config, bundle or control-plane request may ask of an edge.

One table for every number, string, list and map a model accepts: the config models, the
control-plane API's request bodies and parameters (verge.control.api) and the edge's Wasm
runtime (verge.compute.runtime) all use these names, so what the API accepts is what an
edge can run. A tenant writes services and functions through the API: per-service bounds
keep one tenant's config from starving every other tenant on the same edge workers.
tests/control/test_bounds.py fails for any field of the config or the API without a bound.

Every name here is re-exported by verge.config (``from verge.config import MAX_NAME``).
"""

# Byte multiples: binary, as in nginx and Varnish (1k = 1KiB = 1024 bytes).
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

# Text
MAX_NAME = 63
"""Slugs and names: services, tenants, functions, certificates, nodes, KV namespaces."""
MAX_LABEL = 200
"""Short free text and identifiers: token names, variable and parameter names, media types
(200: the control plane's label columns)."""
MAX_HOST = 255
"""A host name (253) with a "*." wildcard prefix; also Host headers and TLS server names."""
MAX_URL = 8 * KiB
"""An absolute URL or a URL to purge (the edge's default max_url_bytes)."""
MAX_URL_PATH = 1024
"""A URL path or path glob: rule paths, function routes, health-check paths."""
MAX_FILE_PATH = 4096
"""A file system path (PATH_MAX)."""
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8 * KiB
MAX_SECRET = 1024
"""Secrets and tokens (signing secrets, upload tokens)."""
MAX_PEM = 256 * KiB
"""One PEM text: a certificate chain or a private key."""
MAX_TEXT = 64 * KiB
"""Free text carried but not interpreted (environment values, log lines)."""

# One service (the unit a tenant controls)
MAX_HOSTS_PER_SERVICE = 1000
MAX_ORIGINS = 100
"""Origins of one service, or of one rule."""
MAX_ORIGIN_WEIGHT = 1000
MAX_RULES = 200
"""Rules of one service: every request scans them in order."""
MAX_HEADER_EDITS = 64
"""Entries of one header list or map (added, removed, cache-key headers)."""
MAX_STATUS_PATTERNS = 100
MAX_HEALTH_STREAK = 100
"""Health-check fails/passes thresholds."""
MIN_HEALTH_INTERVAL = 0.1
"""Seconds; a shorter interval would turn health checks into a flood against the origin."""

# Time
MAX_TIMEOUT = 86_400.0
"""Seconds, for any timeout or interval (timers beyond a day are a mistake, not a wish)."""
MAX_TTL = 10 * 365 * 86_400.0
"""Seconds, for cache lifetimes and HSTS max-age (ten years)."""

# Sizes
MAX_BYTE_SIZE = PiB
"""Any byte count (caches, quotas, body limits): caps and comparisons, not allocations."""
MAX_REQUEST_HEAD_BYTES = 1 * MiB
"""max_header_bytes and max_url_bytes: buffered for every connection."""

# The whole config (all tenants' services, as the control plane bundles them)
MAX_SERVICES = 100_000
MAX_CERTIFICATES = 100_000
MAX_CERTIFICATE_HOSTS = 1000
MAX_FUNCTIONS = 10_000
MAX_INGEST_ROUTES = 1000
MAX_LIST = 100
"""Short lists: compression types, function routes and fetch hosts, environment variables."""

# Edge functions
MAX_FUNCTION_MEMORY_MB = 256
"""The largest linear memory a function may have; verge.compute.runtime sizes its pooling
allocator's slots from it, so every deployable function fits an edge."""
MAX_FUNCTION_CPU_MS = 60_000.0
MAX_SUBREQUESTS = 100

# Streaming and device ingest
MAX_STREAM_APPS = 100
MAX_STREAM_KEYS = 10_000
MAX_RENDITIONS = 16
MAX_WEBRTC_CANDIDATES = 16
"""Addresses a stream server gathers or advertises WebRTC candidates on."""
MAX_WEBRTC_VIEWERS = 100_000
MAX_QUOTA_RECORDS = 1_000_000_000
MAX_BATCH_RECORDS = 100_000

# Control-plane inputs (verge.control.api)
MAX_SEQ = 2**63 - 1
"""Purge sequence numbers, config versions, KV sequence numbers: 64-bit columns."""
MAX_VERSION = 2**31 - 1
"""Service and function versions: 32-bit columns."""
MAX_TIMESTAMP = 253_402_300_799.0
"""Epoch seconds of 9999-12-31T23:59:59Z, the last instant a datetime can hold."""
MAX_SAMPLE_COUNT = 2**40
"""One stats sample's counter (requests, bytes, ...) over a few seconds of one node."""
MAX_STATS_SAMPLES = 100_000
"""Samples in one stats upload."""
MAX_LOG_RECORDS = 10_000
"""Function log records in one upload."""
MAX_REPORT_KEYS = 64
"""Keys of one reported map: a heartbeat's health or load, one log record."""
MAX_REPORT_LIST = 1000
"""Items of one list in a report (a log record's denied capabilities)."""
MAX_OFFSET = 1_000_000_000
"""Paging offset."""
MAX_WAIT = 3600.0
"""Seconds a long poll may ask for (the server clips it further to its own max_wait)."""
MAX_PURGE_URLS = 10_000
MAX_PURGE_PREFIXES = 1000
MAX_PURGE_TAGS = 1000
MAX_NODE_URL = 500
"""An edge node's public or admin URL (500-character columns)."""
