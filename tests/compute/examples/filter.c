/* An ingest filter: NDJSON readings on stdin, the ones to keep on stdout. Drops negative
 * values (a broken sensor) and tags the rest with the edge that saw them. */
#include <stdio.h>
#include <string.h>

static char line[8192];

int main(void) {
    fputs("Content-Type: application/x-ndjson\n\n", stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strstr(line, "\"value\":-")) continue;
        size_t n = strlen(line);
        while (n && (line[n - 1] == '\n' || line[n - 1] == '}')) line[--n] = 0;
        printf("%s,\"filtered\":true}\n", line);
    }
    return 0;
}
