/* Echoes the CGI environment and the request body; PATH_INFO picks special answers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

int main(void) {
    const char *path = getenv("PATH_INFO");
    if (path && strcmp(path, "/redirect") == 0) {
        fputs("Location: https://example.com/elsewhere\n\n", stdout);
        return 0;
    }
    if (path && strcmp(path, "/pass") == 0) {
        printf("X-Verge-Pass: 1\nX-Verge-Rewrite-Path: /rewritten?from=%s\n"
               "X-Verge-Set-Header: X-From-Function: yes\nX-Verge-Remove-Header: Cookie\n\n",
               getenv("REQUEST_METHOD"));
        return 0;
    }
    if (path && strcmp(path, "/garbage") == 0) {
        fputs("this is not a CGI response", stdout);
        return 0;
    }
    if (path && strcmp(path, "/fail") == 0) {
        fputs("something went wrong\n", stderr);
        return 3;
    }
    printf("Status: 201 Created\nContent-Type: text/plain\nX-Method: %s\n\n",
           getenv("REQUEST_METHOD"));
    for (char **e = environ; *e; e++) printf("%s\n", *e);
    fputs("--body--\n", stdout);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) fwrite(buf, 1, n, stdout);
    fputs("log line for the edge\n", stderr);
    return 0;
}
