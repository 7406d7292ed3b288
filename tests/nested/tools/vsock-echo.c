/*
 * vsock-echo: a tiny static helper for the nested vsock test (tests/nested).
 *
 *   vsock-echo connect CID PORT MSG   AF_VSOCK: connect, send MSG, print the reply
 *   vsock-echo listen PORT            AF_VSOCK: accept one connection, echo it back
 *   vsock-echo unix-echo PATH         AF_UNIX: accept connections forever, echo each
 *   vsock-echo unix-connect PATH PORT MSG
 *                                     AF_UNIX: Vessel's host side: "CONNECT PORT\n",
 *                                     expect "OK ...\n", send MSG, print the reply
 *
 * Prints "VSOCK: <what> <reply>" lines; exits non-zero on any failure.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char *what) {
    printf("VSOCK: FAIL %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* Reads until `want` bytes or EOF. */
static ssize_t read_full(int fd, char *buf, size_t want) {
    size_t got = 0;
    while (got < want) {
        ssize_t n = read(fd, buf + got, want - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

static void echo_once(int c) {
    char buf[4096];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (write(c, buf, (size_t)n) != n) break;
    }
    close(c);
}

static void send_and_print(int s, const char *msg, const char *what) {
    size_t len = strlen(msg);
    char buf[4096];
    if (len >= sizeof buf) { errno = EMSGSIZE; die("message"); }
    if (write(s, msg, len) != (ssize_t)len) die("write");
    ssize_t n = read_full(s, buf, len);
    if (n < 0) die("read");
    buf[n] = 0;
    printf("VSOCK: %s %s\n", what, buf);
    fflush(stdout);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                                .svm_cid = (unsigned)atoi(argv[2]),
                                .svm_port = (unsigned)atoi(argv[3])};
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
        send_and_print(s, argv[4], "guest-to-host");
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                                .svm_cid = VMADDR_CID_ANY,
                                .svm_port = (unsigned)atoi(argv[2])};
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
        if (listen(s, 4) < 0) die("listen");
        printf("VSOCK: listening on %s\n", argv[2]);
        int c = accept(s, NULL, NULL);
        if (c < 0) die("accept");
        echo_once(c);
        printf("VSOCK: served one connection\n");
        return 0;
    }
    if ((argc == 3 && !strcmp(argv[1], "unix-echo")) ||
        (argc == 5 && !strcmp(argv[1], "unix-connect"))) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        if (strlen(argv[2]) >= sizeof a.sun_path) { errno = ENAMETOOLONG; die("path"); }
        strcpy(a.sun_path, argv[2]);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        if (argc == 3) {
            unlink(argv[2]);
            if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
            if (listen(s, 16) < 0) die("listen");
            for (;;) {
                int c = accept(s, NULL, NULL);
                if (c < 0 && errno == EINTR) continue;
                if (c < 0) die("accept");
                echo_once(c);
            }
        }
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
        char cmd[64], line[128];
        int len = snprintf(cmd, sizeof cmd, "CONNECT %s\n", argv[3]);
        if (write(s, cmd, (size_t)len) != len) die("write CONNECT");
        /* The answer is one line: "OK <host port>\n". */
        size_t got = 0;
        while (got + 1 < sizeof line) {
            ssize_t n = read(s, line + got, 1);
            if (n <= 0) { errno = n ? errno : ECONNRESET; die("read OK"); }
            if (line[got++] == '\n') break;
        }
        line[got] = 0;
        if (strncmp(line, "OK ", 3)) { errno = EPROTO; die(line); }
        send_and_print(s, argv[4], "host-to-guest");
        return 0;
    }
    fprintf(stderr, "usage: see the comment at the top of vsock-echo.c\n");
    return 2;
}
