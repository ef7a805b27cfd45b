/* The smallest function: answers every request. */
#include <stdio.h>

int main(void) {
    fputs("Content-Type: text/plain\n\nhello from wasm\n", stdout);
    return 0;
}
