/* hello.c: the smallest useful edge function. It answers every request itself.
 *
 * The request arrives as CGI environment variables; the answer is printed on stdout:
 * header lines, one blank line, then the body. No import from verge.h is needed.
 *
 *   make functions
 *   verge fn deploy hello examples/functions/build/hello.wasm --service shop --route '/hello*'
 *   curl http://EDGE/hello/world        ->  hello from the edge: GET /hello/world
 */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    const char *method = getenv("REQUEST_METHOD"); /* GET, POST, ... */
    const char *path = getenv("PATH_INFO");        /* the decoded path, e.g. /hello/world */

    /* Headers, then an empty line. "Status:" is optional (200 by default). */
    printf("Content-Type: text/plain; charset=utf-8\n");
    printf("Cache-Control: no-store\n");
    printf("\n");
    /* The body. */
    printf("hello from the edge: %s %s\n", method ? method : "?", path ? path : "/");
    return 0; /* a non-zero exit status would get the client a 500 */
}
