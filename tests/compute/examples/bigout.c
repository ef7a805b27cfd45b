/* Writes $SIZE bytes of body (a response-size limit test). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    const char *size = getenv("SIZE");
    long left = size ? atol(size) : 0;
    static char chunk[65536];
    memset(chunk, 'b', sizeof chunk);
    fputs("Content-Type: application/octet-stream\n\n", stdout);
    while (left > 0) {
        size_t n = left < (long)sizeof chunk ? (size_t)left : sizeof chunk;
        fwrite(chunk, 1, n, stdout);
        left -= (long)n;
    }
    return 0;
}
