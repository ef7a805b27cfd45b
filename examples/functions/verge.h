/* verge.h: what a Verge edge function may ask of the edge (import module "verge").
 *
 * One header, no library: copy it next to your .c file (or pass -I examples/functions).
 *
 * THE ABI (WAGI, see verge/compute/wagi.py). A function is a plain WASI command (main()):
 *   in:  the request as CGI environment variables, read with getenv():
 *          REQUEST_METHOD, PATH_INFO (decoded), X_RAW_PATH_INFO (as sent), QUERY_STRING,
 *          REQUEST_URI, SERVER_NAME, SERVER_PORT, REMOTE_ADDR, CONTENT_TYPE, CONTENT_LENGTH,
 *          HTTP_<HEADER> (one per request header, e.g. HTTP_USER_AGENT), X_MATCHED_ROUTE,
 *          X_FULL_URL, VERGE_REQUEST_ID, VERGE_PHASE ("request" or "response"),
 *          and the variables given at deploy time (`--env NAME=VALUE`);
 *        the request body on stdin.
 *   out: on stdout, CGI header lines, one blank line, the body:
 *        - an answer:  "Content-Type: text/plain\n\nhello\n" (add "Status: 404 Not Found"
 *          for another status; "Location: ..." alone is a 302);
 *        - or a pass:  "X-Verge-Pass: 1\n" [+ "X-Verge-Rewrite-Path: /new/path?q=1\n"]
 *          [+ "X-Verge-Set-Header: Name: value\n"] [+ "X-Verge-Remove-Header: Name\n"]
 *          "\n": the (edited) request continues to the cache and the origin.
 *   logs: whatever the function writes to stderr (fprintf(stderr, ...)) is kept with the
 *        invocation's record (at most 16 KiB per request) and shown by `verge fn logs NAME`.
 *        There is no logging import: stderr is the log.
 *   exit: return 0 from main(); a non-zero exit status, a trap or output that is not CGI
 *        gets the client a 500; breaking a limit gets it a 503. Default limits per request:
 *        50 ms CPU (`--cpu-ms`), 64 MiB memory (`--memory-mb`), 2 MiB of stdout,
 *        8 fetch sub-requests (`--max-subrequests`).
 *
 * THE IMPORTS below are the only ways out of the sandbox (no files, no sockets). Each one
 * checks a capability granted at deploy time; without it the call returns VERGE_E_DENIED
 * (and the denial is named in the invocation's log record). All sizes are bytes; strings
 * are (pointer, length) pairs, not NUL-terminated, and results are not NUL-terminated.
 *
 * Build: clang --target=wasm32-wasi -O2 -Wl,--strip-all -I. fn.c -o fn.wasm
 *        (Debian: apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32;
 *        in this repository: make functions)
 */
#ifndef VERGE_H
#define VERGE_H

#include <stddef.h>

#define VERGE_IMPORT(name) __attribute__((import_module("verge"), import_name(name)))

/* Error codes: every import returns one of these (negative) instead of a length or 0. */
#define VERGE_E_DENIED (-1)      /* capability not granted, or host not on the allow-list */
#define VERGE_E_NOT_FOUND (-2)   /* kv_get: the key is absent */
#define VERGE_E_INVALID (-3)     /* bad KV key (see kv_put); malformed fetch request */
#define VERGE_E_UPSTREAM (-4)    /* fetch: the sub-request failed (connect error, timeout) */
#define VERGE_E_TOO_LARGE (-5)   /* kv_put value or fetch request over the size limit */
#define VERGE_E_UNAVAILABLE (-6) /* the edge has no such service on this node, or it failed */
#define VERGE_E_FULL (-7)        /* KV write: the node's queue of writes is full; try later */

/* Limits enforced by the host (larger inputs get VERGE_E_INVALID / VERGE_E_TOO_LARGE). */
#define VERGE_MAX_KEY_BYTES 512                     /* a KV key: 1..512 bytes (see kv_put) */
#define VERGE_MAX_VALUE_BYTES (1024 * 1024)         /* a KV value: 1 MiB */
#define VERGE_MAX_FETCH_REQUEST_BYTES (1024 * 1024) /* a whole fetch request, body included */

/* verge_kv_get: read `key` from the function's KV namespace.
 *
 * Needs: a KV namespace (`verge fn deploy ... --kv NAMESPACE`; config: kv_namespace).
 * Copies min(length, out_cap) bytes of the value into out and returns the value's full
 * length: a result > out_cap means the value was truncated (call again with a buffer of
 * that size). Values are bytes, not strings: no NUL is added.
 * Errors: VERGE_E_NOT_FOUND (no such key), VERGE_E_DENIED (no namespace granted),
 * VERGE_E_INVALID (key empty or over VERGE_MAX_KEY_BYTES), VERGE_E_UNAVAILABLE.
 * Reads see the edge's replica of the control plane's KV (`verge kv put NS KEY VALUE`)
 * plus this worker's own writes. */
VERGE_IMPORT("kv_get")
int verge_kv_get(const char *key, size_t key_len, char *out, size_t out_cap);

/* verge_kv_put: store `value` under `key` in the function's KV namespace.
 *
 * Needs: a KV namespace and the write grant (`--kv NAMESPACE --kv-write`; config:
 * kv_namespace + kv_write: true).
 * A key written must be text: 1..VERGE_MAX_KEY_BYTES bytes of UTF-8 without NUL (reads
 * take any bytes). The value is any bytes, at most VERGE_MAX_VALUE_BYTES.
 * Returns 0. Errors: VERGE_E_DENIED (no namespace, or no write grant), VERGE_E_INVALID
 * (bad key), VERGE_E_TOO_LARGE (value too large), VERGE_E_FULL (the node's queue of writes
 * to the control plane is full: the control plane has been away for a while),
 * VERGE_E_UNAVAILABLE.
 * Where the write goes: on an edge of a fleet it is stored on the node (on disk) before the
 * call returns, then sent to the control plane, which orders the writes of every edge
 * (the last writer wins) and replicates the result to every edge within seconds. The
 * worker that wrote reads its own write at once. An edge without a control plane keeps
 * a function's writes in that worker's memory. A get followed by a put is not atomic:
 * concurrent requests may lose updates. */
VERGE_IMPORT("kv_put")
int verge_kv_put(const char *key, size_t key_len, const char *value, size_t value_len);

/* verge_kv_delete: remove `key` from the function's KV namespace.
 *
 * Needs, returns, errors and where it goes: as verge_kv_put (without the value). Deleting
 * a key that is absent is not an error (returns 0). */
VERGE_IMPORT("kv_delete")
int verge_kv_delete(const char *key, size_t key_len);

/* verge_fetch: one HTTP sub-request, made by the edge on the function's behalf.
 *
 * Needs: the target host on the allow-list (`--fetch-host api.example.com`, repeatable;
 * entries are host, host:port or *.suffix; config: fetch_hosts). http and https only.
 * req is the request as text: "METHOD URL" line, "Name: value" header lines, a blank line,
 * the body, e.g. "GET http://api.example.com/v1/x\nAccept: text/plain\n\n" (at most
 * VERGE_MAX_FETCH_REQUEST_BYTES). Redirects are not followed.
 * out receives the response in CGI form: "Status: 200 OK\n", header lines (names in any
 * case: compare them case-insensitively), a blank line, the body; min(length, out_cap)
 * bytes are copied and the full length is returned (a result > out_cap: truncated).
 * An HTTP error status (404, 500, ...) is a response, not an error code.
 * Errors: VERGE_E_DENIED (host not allowed, or not http(s)), VERGE_E_INVALID (malformed
 * request), VERGE_E_TOO_LARGE, VERGE_E_UPSTREAM (connect error, timeout),
 * VERGE_E_UNAVAILABLE.
 * Limit: at most max_subrequests calls per request (`--max-subrequests`, default 8);
 * the call past the limit does not return: the invocation stops and the client gets a 503.
 * Each sub-request may take 5 s; waiting for it is not charged to the function's CPU time. */
VERGE_IMPORT("fetch")
int verge_fetch(const char *req, size_t req_len, char *out, size_t out_cap);

#endif
