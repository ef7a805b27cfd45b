/* Allocates and touches 1 MiB after 1 MiB, never checking for NULL. */
#include <stdlib.h>
#include <string.h>

char *volatile last_block; /* escapes, so the compiler keeps every allocation */

int main(void) {
    for (;;) {
        char *p = malloc(1 << 20);
        memset(p, 'x', 1 << 20);
        last_block = p;
    }
}
