/* Never finishes: must be stopped by the CPU limit. */
#include <stdio.h>

int main(void) {
    volatile unsigned long spins = 0;
    fputs("Content-Type: text/plain\n\n", stdout);
    for (;;) spins++;
}
