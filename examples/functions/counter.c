/* counter.c: a visit counter in the edge KV.
 *
 * Reads the key "visits", adds one, writes it back and prints the count. Nothing survives
 * between two requests inside the function (each runs in a fresh instance): state lives in
 * the KV, which the deploy must grant, writes included:
 *
 *   verge fn deploy counter examples/functions/build/counter.wasm --service shop \
 *       --route /count --kv counters --kv-write
 *   curl http://EDGE/count             ->  visits: 1   (then 2, 3, ...)
 *
 * With a control plane, writes reach every edge (the last writer wins); an edge without
 * one keeps them in the worker's memory. A get + put is not atomic, so concurrent visits
 * may be counted once: a demo, not a billing system. Errors go to stderr (`verge fn logs`).
 */
#include <stdio.h>
#include <stdlib.h>
#include "verge.h"

static const char KEY[] = "visits";

/* The stored count, 0 when the key is absent; -1 (after logging why) on an error. */
static long read_count(void) {
    char value[32];
    int len = verge_kv_get(KEY, sizeof KEY - 1, value, sizeof value - 1);
    if (len == VERGE_E_NOT_FOUND) return 0; /* first visit */
    if (len < 0) {
        fprintf(stderr, "kv_get %s failed: %d\n", KEY, len); /* e.g. -1: no --kv */
        return -1;
    }
    if (len > (int)sizeof value - 1) len = sizeof value - 1; /* truncated: not a number */
    value[len] = '\0'; /* values are bytes: add the terminator ourselves */
    return strtol(value, NULL, 10);
}

int main(void) {
    long count = read_count();
    if (count < 0) {
        printf("Status: 503 Service Unavailable\nContent-Type: text/plain\n\nno counter\n");
        return 0;
    }
    count++;
    char value[32];
    int value_len = snprintf(value, sizeof value, "%ld", count);
    int put = verge_kv_put(KEY, sizeof KEY - 1, value, (size_t)value_len);
    if (put != 0) fprintf(stderr, "kv_put %s failed: %d\n", KEY, put); /* -1: no --kv-write */

    printf("Content-Type: text/plain\nCache-Control: no-store\n\n");
    printf("visits: %ld%s\n", count, put == 0 ? "" : " (not saved)");
    return 0;
}
