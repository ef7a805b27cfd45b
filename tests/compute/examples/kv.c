/* Reads the "greeting" key and counts visits in the "visits" key. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "verge.h"

int main(void) {
    char value[256];
    int got = verge_kv_get("greeting", 8, value, sizeof value - 1);
    char visits[32] = "0";
    int seen = verge_kv_get("visits", 6, visits, sizeof visits - 1);
    if (seen >= 0) visits[seen < (int)sizeof visits - 1 ? seen : (int)sizeof visits - 1] = 0;
    else strcpy(visits, "0");
    char next[32];
    int next_len = snprintf(next, sizeof next, "%d", atoi(visits) + 1);
    int put = verge_kv_put("visits", 6, next, (size_t)next_len);
    printf("Content-Type: text/plain\n\n");
    if (got >= 0) printf("get=%d:%.*s\n", got, got, value);
    else printf("get=%d\n", got);
    printf("put=%d visits=%s\n", put, next);
    return 0;
}
