/* verge.h: the host functions of Verge edge compute (import module "verge").
 *
 * A function is a plain WASI command: the request arrives as CGI environment variables
 * (getenv("REQUEST_METHOD"), "PATH_INFO", "QUERY_STRING", "HTTP_*", ...) with the body on
 * stdin; it prints CGI headers, a blank line and the body on stdout. These imports add
 * what WASI does not have. Build: clang --target=wasm32-wasi -O2 fn.c -o fn.wasm
 */
#ifndef VERGE_H
#define VERGE_H

#include <stddef.h>

#define VERGE_IMPORT(name) __attribute__((import_module("verge"), import_name(name)))

/* Error codes (negative return values). */
#define VERGE_E_DENIED (-1)      /* capability not granted / host not allowed */
#define VERGE_E_NOT_FOUND (-2)   /* KV key absent */
#define VERGE_E_INVALID (-3)     /* malformed key or request */
#define VERGE_E_UPSTREAM (-4)    /* the sub-request failed */
#define VERGE_E_TOO_LARGE (-5)   /* value or request too large */
#define VERGE_E_UNAVAILABLE (-6) /* no such service on this node */

/* Value of `key` in the function's KV namespace: copies min(len, out_cap) bytes into out
 * and returns the full length (a result > out_cap means: retry with a bigger buffer). */
VERGE_IMPORT("kv_get")
int verge_kv_get(const char *key, size_t key_len, char *out, size_t out_cap);

/* Store a value (needs the kv write grant). Returns 0 or an error. */
VERGE_IMPORT("kv_put")
int verge_kv_put(const char *key, size_t key_len, const char *value, size_t value_len);

/* One HTTP sub-request to an allowed host. req: "GET http://host/path\nName: value\n\nbody".
 * out receives "Status: 200 OK\nName: value\n\nbody" (truncated to out_cap); returns its
 * full length. Going over the per-request sub-request limit stops the function. */
VERGE_IMPORT("fetch")
int verge_fetch(const char *req, size_t req_len, char *out, size_t out_cap);

#endif
