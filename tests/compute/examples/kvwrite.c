/* Writes the edge KV as the query string says (tests of durable, replicated writes):
 *   ?op=put&key=K&value=V   ->  "put=<code>"
 *   ?op=get&key=K           ->  "get=<value>" or "get=<error code>"
 *   ?op=del&key=K           ->  "del=<code>"
 *   ?op=incr&key=K          ->  "incr=<new count> put=<code>" (a get then a put: not atomic)
 *   ?op=big&key=K&size=N    ->  "big=<code>" (a value of N bytes)
 * Values and keys are taken as sent (tests use plain letters and digits). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "verge.h"

/* kv_delete(key_ptr, key_len) -> 0 | error (verge/compute/host.py) */
__attribute__((import_module("verge"), import_name("kv_delete")))
int kvwrite_delete(const char *key, size_t key_len);

static const char *param(const char *query, const char *name, size_t *len) {
    size_t n = strlen(name);
    for (const char *p = query; p && *p; p = strchr(p, '&') ? strchr(p, '&') + 1 : NULL) {
        if (strncmp(p, name, n) == 0 && p[n] == '=') {
            const char *value = p + n + 1;
            const char *end = strchr(value, '&');
            *len = end ? (size_t)(end - value) : strlen(value);
            return value;
        }
    }
    *len = 0;
    return NULL;
}

static int is(const char *op, size_t len, const char *name) {
    return len == strlen(name) && strncmp(op, name, len) == 0;
}

static char buffer[4096];

int main(void) {
    const char *query = getenv("QUERY_STRING");
    size_t op_len, key_len, value_len, size_len;
    const char *op = param(query ? query : "", "op", &op_len);
    const char *key = param(query ? query : "", "key", &key_len);
    const char *value = param(query ? query : "", "value", &value_len);
    const char *size = param(query ? query : "", "size", &size_len);
    printf("Content-Type: text/plain\nCache-Control: no-store\n\n");
    if (!op || !key) {
        printf("usage: ?op=put|get|del|incr|big&key=K[&value=V][&size=N]\n");
    } else if (is(op, op_len, "put")) {
        printf("put=%d\n", verge_kv_put(key, key_len, value ? value : "", value_len));
    } else if (is(op, op_len, "get")) {
        int got = verge_kv_get(key, key_len, buffer, sizeof buffer);
        if (got < 0) printf("get=%d\n", got);
        else printf("get=%.*s\n", got < (int)sizeof buffer ? got : (int)sizeof buffer, buffer);
    } else if (is(op, op_len, "del")) {
        printf("del=%d\n", kvwrite_delete(key, key_len));
    } else if (is(op, op_len, "incr")) {
        int got = verge_kv_get(key, key_len, buffer, sizeof buffer - 1);
        buffer[got > 0 && got < (int)sizeof buffer ? got : 0] = 0;
        int count = atoi(buffer) + 1;
        int len = snprintf(buffer, sizeof buffer, "%d", count);
        int put = verge_kv_put(key, key_len, buffer, (size_t)len);
        printf("incr=%d put=%d\n", count, put);
    } else if (is(op, op_len, "big")) {
        size_t n = size ? (size_t)atol(size) : 0;
        char *big = malloc(n ? n : 1);
        memset(big, 'x', n);
        printf("big=%d\n", verge_kv_put(key, key_len, big, n));
    } else {
        printf("unknown op\n");
    }
    return 0;
}
