/* fetch_rewrite.c: fetch from an allowed upstream, decorate the answer; else pass it on.
 *
 * A request for PATH is fetched from $UPSTREAM PATH (UPSTREAM is a variable given at deploy
 * time; its host must be allowed with --fetch-host). A 200 answer is sent to the client with
 * a banner line before the body and an X-Decorated header. Anything else (the fetch failed,
 * the upstream said 404, ...) is not answered here: the function passes, rewriting the path
 * to /fallback PATH, and the request continues to the service's cache and origin.
 *
 *   verge fn deploy quotes examples/functions/build/fetch_rewrite.wasm --service shop \
 *       --route /quotes/ --env UPSTREAM=http://api.example.com --fetch-host api.example.com
 *   curl http://EDGE/quotes/today      ->  [via the edge] <api.example.com/quotes/today's body>
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "verge.h"

static char request[4096];
static char response[64 * 1024]; /* the whole upstream response must fit (headers + body) */

/* The value of header `name` in a CGI-form response head (NUL-terminated in place), or NULL.
 * The head ends at `body`; header names may come in any case. */
static char *header(char *head, const char *body, const char *name) {
    size_t n = strlen(name);
    for (char *line = head; line < body; line = strchr(line, '\n') + 1) {
        if (strncasecmp(line, name, n) == 0 && line[n] == ':') {
            char *value = line + n + 1;
            while (*value == ' ') value++;
            value[strcspn(value, "\r\n")] = '\0';
            return value;
        }
    }
    return NULL;
}

/* Hand the request back to the edge: to the cache and origin, at /fallback PATH?QUERY. */
static int pass_to_origin(const char *path, const char *query, const char *why) {
    fprintf(stderr, "fallback for %s: %s\n", path, why); /* shows in `verge fn logs` */
    printf("X-Verge-Pass: 1\n");
    printf("X-Verge-Rewrite-Path: /fallback%s%s%s\n", path, *query ? "?" : "", query);
    printf("X-Verge-Set-Header: X-Fallback-Reason: %s\n", why);
    printf("\n");
    return 0;
}

int main(void) {
    const char *upstream = getenv("UPSTREAM"); /* e.g. http://api.example.com */
    const char *path = getenv("X_RAW_PATH_INFO"); /* the path as sent (still %-encoded) */
    const char *query = getenv("QUERY_STRING"); /* "" when there is none */
    if (!path) path = "/";
    if (!query) query = "";
    if (!upstream) return pass_to_origin(path, query, "no UPSTREAM");

    /* 1. The sub-request: "METHOD URL", header lines, blank line (no body for a GET). */
    int req_len = snprintf(request, sizeof request, "GET %s%s%s%s\nAccept: text/plain\n\n",
                           upstream, path, *query ? "?" : "", query);
    if (req_len >= (int)sizeof request) return pass_to_origin(path, query, "URL too long");

    /* 2. Fetch. The answer is "Status: 200 OK\nname: value\n\nbody", or an error code. */
    int len = verge_fetch(request, (size_t)req_len, response, sizeof response - 1);
    if (len < 0) return pass_to_origin(path, query, len == VERGE_E_DENIED ? "host not allowed"
                                                    : "upstream unreachable");
    if (len > (int)sizeof response - 1) return pass_to_origin(path, query, "answer too large");
    response[len] = '\0';

    /* 3. Split head and body; only a 200 is decorated. */
    char *blank = strstr(response, "\n\n");
    if (!blank) return pass_to_origin(path, query, "malformed answer");
    char *body = blank + 2;
    int status = atoi(response + strlen("Status: "));
    if (status != 200) return pass_to_origin(path, query, "upstream status not 200");
    const char *type = header(response, body, "Content-Type");

    /* 4. Answer: the upstream's type, our headers, a banner, then the upstream body. */
    printf("Content-Type: %s\n", type ? type : "text/plain");
    printf("X-Decorated: fetch_rewrite\n");
    printf("\n");
    printf("[via the edge] ");
    fwrite(body, 1, (size_t)(response + len - body), stdout); /* the body may hold NULs */
    return 0;
}
