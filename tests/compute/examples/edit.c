/* Response editing: stdin is the origin response in CGI form. Small HTML responses get a
 * banner appended; anything else is passed through with an extra header. */
#include <stdio.h>
#include <string.h>

static char in[1 << 16];

int main(void) {
    size_t n = fread(in, 1, sizeof in - 1, stdin);
    in[n] = 0;
    char *body = strstr(in, "\n\n");
    int html = strstr(in, "Content-Type: text/html") != NULL;
    if (!html || !body) {
        fputs("X-Verge-Pass: 1\nX-Verge-Set-Header: X-Edited: no\n"
              "X-Verge-Remove-Header: Server\n\n", stdout);
        return 0;
    }
    body += 2;
    printf("Status: 200 OK\nContent-Type: text/html\nX-Edited: yes\n\n%s<p>edited at the edge</p>",
           body);
    return 0;
}
