/* Tries to reach outside the sandbox: files, directories, sockets. Reports what happened. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(void) {
    FILE *passwd = fopen("/etc/passwd", "r");
    FILE *created = fopen("/tmp/verge-escape.txt", "w");
    FILE *relative = fopen("secrets.txt", "r");
    DIR *root = opendir("/");
    char buf[16];
    errno = 0;
    long received = recv(3, buf, sizeof buf, 0);
    int recv_errno = errno;
    errno = 0;
    int shut = shutdown(4, SHUT_RDWR);
    int shut_errno = errno;
    printf("Content-Type: text/plain\n\n");
    printf("passwd=%s\ncreate=%s\nrelative=%s\nopendir=%s\n", passwd ? "OPEN" : "NULL",
           created ? "OPEN" : "NULL", relative ? "OPEN" : "NULL", root ? "OPEN" : "NULL");
    printf("recv=%ld errno=%s\nshutdown=%d errno=%s\n", received, strerror(recv_errno), shut,
           strerror(shut_errno));
    return 0;
}
