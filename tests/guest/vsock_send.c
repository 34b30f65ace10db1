/*
 * vsock-send: send stdin over a vsock stream and print what comes back.
 *
 * usage: vsock-send PORT [CID]
 *
 * Connects an AF_VSOCK stream socket to CID:PORT (CID 2, the host, by default), copies stdin to
 * it until EOF, then shuts down the write side (SHUT_WR), and copies everything the peer sends
 * to stdout until the peer's EOF. Both directions run at once (one poll loop), so a peer that
 * answers while it still reads, such as vsock-echo, cannot deadlock a large transfer; a peer
 * that shuts down its own write side early still gets the rest of stdin.
 *
 * Exit status: 0 success; 1 an error, with one line on stderr naming the call, e.g.
 *   vsock-send: connect to 2:5000: Connection reset by peer
 *   vsock-send: send to 2:5000: Broken pipe
 * (calls: socket, connect to C:P, read stdin, send to C:P, shutdown(SHUT_WR) to C:P,
 * recv from C:P, write stdout, poll); 2 bad usage. Nothing else is printed.
 *
 * Build: gcc -O2 -static -o vsock-send vsock_send.c
 * (-DTEST_UNIX: AF_UNIX instead, for host tests; see vsock_common.h.)
 */
#include "vsock_common.h"

static int usage(void)
{
    fprintf(stderr, "usage: vsock-send PORT [CID]\n"
                    "PORT 0..%lu, CID 0..%lu (default 2, the host)\n",
            MAX_PORT, MAX_CID);
    return 2;
}

/* Connects to cid:port; returns the socket, or -1 after a message. */
static int connect_to(uint32_t cid, uint32_t port)
{
    union addr a;
    socklen_t len;
    if (!make_addr(cid, port, &a, &len))
        return -1;
    int s = new_socket();
    if (s < 0) {
        complain(errno, "socket");
        return -1;
    }
    if (connect(s, &a.sa, len) < 0) {
        int err = errno;
        if (err == EINTR) {
            /* The connection goes on in the background: wait for its outcome. */
            socklen_t elen = sizeof(err);
            if (wait_fd(s, POLLOUT) < 0 || getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
                err = errno;
        }
        if (err) {
            complain(err, "connect to %u:%u", cid, port);
            close(s);
            return -1;
        }
    }
    int fl = fcntl(s, F_GETFL);
    if (fl < 0 || fcntl(s, F_SETFL, fl | O_NONBLOCK) < 0) {
        complain(errno, "fcntl");
        close(s);
        return -1;
    }
    return s;
}

static int is_again(int err)
{
    return err == EINTR || err == EAGAIN || err == EWOULDBLOCK;
}

/* The copy loop; 0 on success, 1 after a message. */
static int relay(int s, uint32_t cid, uint32_t port)
{
    static char out[BUF_SIZE]; /* stdin -> socket, pending bytes out[off..len) */
    static char in[BUF_SIZE];  /* socket -> stdout */
    size_t off = 0, len = 0;
    int stdin_eof = 0, shut = 0, sock_eof = 0;

    while (!shut || !sock_eof) {
        if (stdin_eof && off == len && !shut) {
            if (shutdown(s, SHUT_WR) < 0) {
                complain(errno, "shutdown(SHUT_WR) to %u:%u", cid, port);
                return 1;
            }
            shut = 1;
            continue;
        }
        struct pollfd p[2] = {
            {.fd = !stdin_eof && off == len ? 0 : -1, .events = POLLIN},
            {.fd = s, .events = (short)((sock_eof ? 0 : POLLIN) | (off < len ? POLLOUT : 0))},
        };
        if (!p[1].events)
            p[1].fd = -1;
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            complain(errno, "poll");
            return 1;
        }

        if (!sock_eof && p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(s, in, sizeof(in), 0);
            if (n > 0) {
                if (write_all(1, in, (size_t)n, 0) < 0) {
                    complain(errno, "write stdout");
                    return 1;
                }
            } else if (n == 0) {
                sock_eof = 1;
            } else if (!is_again(errno)) {
                complain(errno, "recv from %u:%u", cid, port);
                return 1;
            }
        }
        if (off < len && p[1].revents & (POLLOUT | POLLHUP | POLLERR)) {
            ssize_t n = send(s, out + off, len - off, MSG_NOSIGNAL);
            if (n >= 0) {
                off += (size_t)n;
            } else if (!is_again(errno)) {
                complain(errno, "send to %u:%u", cid, port);
                return 1;
            }
        }
        if (p[0].fd >= 0 && p[0].revents) {
            ssize_t n = read(0, out, sizeof(out));
            if (n > 0) {
                off = 0;
                len = (size_t)n;
            } else if (n == 0) {
                stdin_eof = 1;
            } else if (!is_again(errno)) {
                complain(errno, "read stdin");
                return 1;
            }
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    uint32_t port, cid = 2;
    prog = "vsock-send";
    if (argc < 2 || argc > 3 || !parse_u32(argv[1], 0, MAX_PORT, &port) ||
        (argc == 3 && !parse_u32(argv[2], 0, MAX_CID, &cid)))
        return usage();
    ignore_sigpipe();
    int s = connect_to(cid, port);
    if (s < 0)
        return 1;
    int rc = relay(s, cid, port);
    close(s);
    return rc;
}
