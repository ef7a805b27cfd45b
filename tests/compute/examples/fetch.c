/* Fetches $TARGET (a variable declared at deploy time) $TIMES times; prints each result. */
#include <stdio.h>
#include <stdlib.h>
#include "verge.h"

int main(void) {
    const char *target = getenv("TARGET");
    const char *times = getenv("TIMES");
    int n = times ? atoi(times) : 1;
    static char req[1024], resp[8192];
    int req_len = snprintf(req, sizeof req, "GET %s\nAccept: text/plain\n\n", target);
    printf("Content-Type: text/plain\n\n");
    for (int i = 0; i < n; i++) {
        int got = verge_fetch(req, (size_t)req_len, resp, sizeof resp);
        if (got < 0) {
            printf("fetch %d: error %d\n", i, got);
        } else {
            int shown = got < (int)sizeof resp ? got : (int)sizeof resp;
            printf("fetch %d: %d bytes\n%.*s\n", i, got, shown, resp);
        }
    }
    return 0;
}
