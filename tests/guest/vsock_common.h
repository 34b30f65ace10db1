/*
 * Shared by vsock_send.c and vsock_echo.c (each is one translation unit that includes this).
 *
 * The socket family is AF_VSOCK. Built with -DTEST_UNIX it is AF_UNIX instead, so the byte
 * copying can be checked on a host without vsock loopback (tests/guest/test.sh): port P is then
 * the socket file $VSOCK_TEST_UNIX_DIR/port-P (default directory /tmp) and the CID is only
 * printed, never used; $VSOCK_TEST_SNDBUF, if set, is every socket's SO_SNDBUF. Everything else,
 * messages included, is the same.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#ifdef TEST_UNIX
#include <sys/un.h>
#define VMADDR_CID_ANY 0xffffffffU
#else
#include <linux/vm_sockets.h>
#endif

/* Not every program uses every helper. */
#define HELPER static __attribute__((unused))

#define BUF_SIZE (64 * 1024)
#define MAX_PORT 0xfffffffeUL /* 0xffffffff is VMADDR_PORT_ANY */
#define MAX_CID 0xfffffffeUL  /* 0xffffffff is VMADDR_CID_ANY */

static const char *prog;

/* "PROG: WHAT: strerror(err)" on stderr. */
HELPER void __attribute__((format(printf, 2, 3))) complain(int err, const char *fmt, ...)
{
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(err));
}

/* A decimal number in min..max, nothing else. */
HELPER int parse_u32(const char *s, unsigned long min, unsigned long max, uint32_t *out)
{
    char *end;
    if (*s < '0' || *s > '9')
        return 0;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        return 0;
    *out = (uint32_t)v;
    return 1;
}

/* The socket address of CID:PORT (the CID is ignored under TEST_UNIX). */
union addr {
    struct sockaddr sa;
#ifdef TEST_UNIX
    struct sockaddr_un un;
#else
    struct sockaddr_vm vm;
#endif
};

HELPER int make_addr(uint32_t cid, uint32_t port, union addr *a, socklen_t *len)
{
    memset(a, 0, sizeof(*a));
#ifdef TEST_UNIX
    (void)cid;
    const char *dir = getenv("VSOCK_TEST_UNIX_DIR");
    if (!dir || !*dir)
        dir = "/tmp";
    a->un.sun_family = AF_UNIX;
    int n = snprintf(a->un.sun_path, sizeof(a->un.sun_path), "%s/port-%u", dir, port);
    if (n < 0 || (size_t)n >= sizeof(a->un.sun_path)) {
        fprintf(stderr, "%s: VSOCK_TEST_UNIX_DIR is too long\n", prog);
        return 0;
    }
    *len = sizeof(a->un);
#else
    a->vm.svm_family = AF_VSOCK;
    a->vm.svm_cid = cid;
    a->vm.svm_port = port;
    *len = sizeof(a->vm);
#endif
    return 1;
}

/*
 * Under TEST_UNIX, $VSOCK_TEST_SNDBUF sets SO_SNDBUF of every socket, so that a test can force
 * the partial sends a vsock stream makes when the peer's credit runs out.
 */
HELPER void test_sndbuf(int s)
{
#ifdef TEST_UNIX
    const char *v = getenv("VSOCK_TEST_SNDBUF");
    int size = v ? atoi(v) : 0;
    if (size > 0)
        setsockopt(s, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
#else
    (void)s;
#endif
}

HELPER int new_socket(void)
{
#ifdef TEST_UNIX
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s >= 0)
        test_sndbuf(s);
    return s;
#else
    return socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
#endif
}

/* Waits until fd is ready for `events`; 0 on success, -1 with errno. */
HELPER int wait_fd(int fd, short events)
{
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int n = poll(&p, 1, -1);
        if (n >= 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/*
 * Writes all of buf to fd: retries partial writes and EINTR, and waits when fd is non-blocking
 * (EAGAIN). Sockets are written with send(MSG_NOSIGNAL). Returns 0, or -1 with errno.
 */
HELPER int write_all(int fd, const char *buf, size_t len, int is_socket)
{
    while (len > 0) {
        ssize_t n = is_socket ? send(fd, buf, len, MSG_NOSIGNAL) : write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (wait_fd(fd, POLLOUT) < 0)
                    return -1;
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A read that retries EINTR. */
HELPER ssize_t read_retry(int fd, char *buf, size_t len)
{
    for (;;) {
        ssize_t n = read(fd, buf, len);
        if (n >= 0 || errno != EINTR)
            return n;
    }
}

HELPER void ignore_sigpipe(void)
{
    /* Writes to a closed peer then fail with EPIPE, which we report, instead of killing us. */
    signal(SIGPIPE, SIG_IGN);
}
