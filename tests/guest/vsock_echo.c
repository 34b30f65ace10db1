/*
 * vsock-echo: a vsock stream echo server.
 *
 * usage: vsock-echo PORT [COUNT]
 *
 * Listens on AF_VSOCK VMADDR_CID_ANY:PORT, prints exactly this line on stdout (flushed) once
 * listening, so a harness can wait for it:
 *
 *   vsock-echo: listening on PORT
 *
 * then serves COUNT connections (default 1), one after the other: echoes every byte back until
 * the peer shuts down its write side (EOF), then shuts down its own and closes. After each
 * connection it logs one line on stderr:
 *
 *   vsock-echo: connection N of COUNT from CID:PORT: echoed BYTES bytes
 *
 * It answers while it reads, so a peer sending much more than the socket buffers hold must read
 * at the same time (vsock-send does).
 *
 * Exit status: 0 after COUNT connections; 1 an error, with one line on stderr naming the call
 * (socket, bind to port P, listen on port P, accept on port P, recv from C:P, send to C:P,
 * write stdout); 2 bad usage.
 *
 * Build: gcc -O2 -static -o vsock-echo vsock_echo.c
 * (-DTEST_UNIX: AF_UNIX instead, for host tests; the peer is then "unix"; see vsock_common.h.)
 */
#include "vsock_common.h"

static int usage(void)
{
    fprintf(stderr, "usage: vsock-echo PORT [COUNT]\n"
                    "PORT 0..%lu, COUNT 1..%lu (default 1)\n",
            MAX_PORT, MAX_PORT);
    return 2;
}

static int listen_on(uint32_t port)
{
    union addr a;
    socklen_t len;
    if (!make_addr(VMADDR_CID_ANY, port, &a, &len))
        return -1;
    int s = new_socket();
    if (s < 0) {
        complain(errno, "socket");
        return -1;
    }
#ifdef TEST_UNIX
    unlink(a.un.sun_path); /* a stale socket file of an earlier run */
#endif
    if (bind(s, &a.sa, len) < 0) {
        complain(errno, "bind to port %u", port);
        close(s);
        return -1;
    }
    if (listen(s, 16) < 0) {
        complain(errno, "listen on port %u", port);
        close(s);
        return -1;
    }
    return s;
}

/* Echoes one connection to its EOF; 0, or 1 after a message. */
static int echo(int c, const char *peer, unsigned long long *bytes)
{
    static char buf[BUF_SIZE];
    for (;;) {
        ssize_t n = read_retry(c, buf, sizeof(buf));
        if (n == 0)
            break;
        if (n < 0) {
            complain(errno, "recv from %s", peer);
            return 1;
        }
        if (write_all(c, buf, (size_t)n, 1) < 0) {
            complain(errno, "send to %s", peer);
            return 1;
        }
        *bytes += (unsigned long long)n;
    }
    shutdown(c, SHUT_WR); /* the peer may be gone already: close tells it as well */
    return 0;
}

int main(int argc, char **argv)
{
    uint32_t port, count = 1;
    prog = "vsock-echo";
    if (argc < 2 || argc > 3 || !parse_u32(argv[1], 0, MAX_PORT, &port) ||
        (argc == 3 && !parse_u32(argv[2], 1, MAX_PORT, &count)))
        return usage();
    ignore_sigpipe();
    int s = listen_on(port);
    if (s < 0)
        return 1;
    if (printf("vsock-echo: listening on %u\n", port) < 0 || fflush(stdout) != 0) {
        complain(errno, "write stdout");
        return 1;
    }
    for (uint32_t i = 1; i <= count; i++) {
        union addr a;
        socklen_t len = sizeof(a);
        int c = accept4(s, &a.sa, &len, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                i--;
                continue;
            }
            complain(errno, "accept on port %u", port);
            return 1;
        }
        test_sndbuf(c);
        char peer[64];
#ifdef TEST_UNIX
        snprintf(peer, sizeof(peer), "unix");
#else
        snprintf(peer, sizeof(peer), "%u:%u", a.vm.svm_cid, a.vm.svm_port);
#endif
        unsigned long long bytes = 0;
        int rc = echo(c, peer, &bytes);
        close(c);
        if (rc)
            return rc;
        fprintf(stderr, "vsock-echo: connection %u of %u from %s: echoed %llu bytes\n", i, count,
                peer, bytes);
    }
    close(s);
    return 0;
}
