/* A global counter: with a fresh instance per request it always prints 1. */
#include <stdio.h>

static int counter;
static char heap_marker[64];

int main(void) {
    counter++;
    int fresh = heap_marker[0] == 0;
    heap_marker[0] = 'x';
    printf("Content-Type: text/plain\n\ncounter=%d fresh=%d\n", counter, fresh);
    return 0;
}
