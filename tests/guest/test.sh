#!/usr/bin/env bash
# Host checks of vsock-send and vsock-echo (tests/guest/vsock_*.c). Exits non-zero on a failure.
#
# usage: tests/guest/test.sh
#
# Builds both programs twice into a throwaway directory: as for the guest (AF_VSOCK), and with
# -DTEST_UNIX (AF_UNIX, socket files in that directory), since a host usually has no vsock
# loopback. The AF_UNIX build checks the byte copying: small, empty, trickled and 16 MiB
# transfers, the exact listening line, stop/continue signals mid-transfer, a peer that shuts
# its write side first, a peer that hangs up, and the error messages. The AF_VSOCK build checks
# what a host without a guest allows: the listening line, bind and connect errors, and, only if
# this host's kernel has vsock loopback (CID 1), a 16 MiB transfer; otherwise it says "skip".
# Needs gcc (static glibc), python3, cmp, timeout.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

failures=0
pass() { echo "ok   $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
skip() { echo "skip $*"; }
# check NAME COMMAND...: passes if the command succeeds.
check() {
    local name=$1
    shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

# --- build ---
cflags=(-O2 -static -Wall -Wextra -Werror)
for prog in send echo; do
    gcc "${cflags[@]}" -o "$work/vsock-$prog" "$here/vsock_$prog.c" || { echo "FAIL build vsock-$prog"; exit 1; }
    gcc "${cflags[@]}" -DTEST_UNIX -o "$work/unix-$prog" "$here/vsock_$prog.c" ||
        { echo "FAIL build vsock-$prog -DTEST_UNIX"; exit 1; }
done
pass "build (AF_VSOCK and -DTEST_UNIX, -Wall -Wextra -Werror)"

export VSOCK_TEST_UNIX_DIR=$work
head -c $((16 << 20)) /dev/urandom >"$work/big"
T=(timeout 60)

# wait_line FILE LINE: waits up to 5 s until FILE's first line is exactly LINE.
wait_line() {
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s $1 && $(head -n1 "$1") == "$2" ]] && return 0
        sleep 0.1
    done
    echo "  want first line '$2' in $1, have: $(head -c 200 "$1")"
    return 1
}
# same_bytes A B: files equal, else show sizes.
same_bytes() {
    cmp -s "$1" "$2" && return 0
    echo "  $1 ($(stat -c %s "$1") bytes) differs from $2 ($(stat -c %s "$2") bytes)"
    return 1
}
# stderr_is FILE REGEX: FILE is exactly one line matching the extended REGEX (anchored).
stderr_is() {
    [[ $(wc -l <"$1") -eq 1 ]] && grep -Eqx -- "$2" "$1" && return 0
    echo "  stderr does not match /$2/: $(head -c 300 "$1")"
    return 1
}

# --- AF_UNIX build: the copying ---
port=5000
"$work/unix-echo" $port 7 >"$work/echo.out" 2>"$work/echo.err" &
echo_pid=$!
pids+=("$echo_pid")
check "unix: listening line" wait_line "$work/echo.out" "vsock-echo: listening on $port"

printf 'hello\n' | "${T[@]}" "$work/unix-send" $port >"$work/out" 2>"$work/err"
check "unix: small transfer (exit $?)" bash -c '[[ $(cat "$1") == hello && ! -s $2 ]]' _ "$work/out" "$work/err"

"${T[@]}" "$work/unix-send" $port </dev/null >"$work/out" 2>"$work/err"
rc=$?
check "unix: empty stdin gives empty output, exit 0" bash -c '[[ $0 == 0 && ! -s $1 && ! -s $2 ]]' "$rc" "$work/out" "$work/err"

# 16 MiB through pipes on both ends, read slowly at first: both directions must run at once
# (the socket buffers hold far less), and partial writes to stdout must be finished.
cat "$work/big" | "${T[@]}" "$work/unix-send" $port | { sleep 0.5; cat; } >"$work/out"
rc=${PIPESTATUS[1]}
check "unix: 16 MiB through pipes (exit $rc)" bash -c '[[ $0 == 0 ]] && cmp "$1" "$2"' "$rc" "$work/out" "$work/big"

# Tiny socket send buffers: sends of the 64 KiB buffer are then partial all the time.
VSOCK_TEST_SNDBUF=4096 "${T[@]}" "$work/unix-send" $port <"$work/big" >"$work/out"
rc=$?
check "unix: 16 MiB with SO_SNDBUF 4096, partial sends (exit $rc)" bash -c '[[ $0 == 0 ]] && cmp "$1" "$2"' "$rc" "$work/out" "$work/big"

# Trickled stdin: many small reads with pauses.
for i in $(seq 1 40); do printf 'line %d\n' "$i"; sleep 0.01; done >"$work/lines"
for i in $(seq 1 40); do printf 'line %d\n' "$i"; sleep 0.01; done | "${T[@]}" "$work/unix-send" $port >"$work/out"
rc=$?
check "unix: trickled stdin (exit $rc)" bash -c '[[ $0 == 0 ]] && cmp -s "$1" "$2"' "$rc" "$work/out" "$work/lines"

# Stopped and continued mid-transfer (interrupted system calls).
"${T[@]}" "$work/unix-send" $port <"$work/big" >"$work/out" 2>"$work/err" &
send_pid=$!
for i in $(seq 1 20); do
    kill -STOP "$send_pid" "$echo_pid" 2>/dev/null
    sleep 0.005
    kill -CONT "$send_pid" "$echo_pid" 2>/dev/null
    sleep 0.005
done
wait "$send_pid"
rc=$?
check "unix: 16 MiB with SIGSTOP/SIGCONT (exit $rc)" bash -c '[[ $0 == 0 && ! -s $3 ]] && cmp -s "$1" "$2"' "$rc" "$work/out" "$work/big" "$work/err"

# Partial writes to a non-blocking stdout pipe (EAGAIN): python sets O_NONBLOCK on the pipe.
python3 - "$work/unix-send" $port "$work/big" "$work/out" <<'EOF'
import os, subprocess, sys, time, fcntl
send, port, big, out = sys.argv[1:]
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
with open(big, "rb") as f:
    p = subprocess.Popen([send, port], stdin=f, stdout=w)
os.close(w)
time.sleep(0.3)
with open(out, "wb") as o:
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        o.write(b)
sys.exit(p.wait())
EOF
rc=$?
check "unix: 16 MiB to a non-blocking stdout (exit $rc)" bash -c '[[ $0 == 0 ]] && cmp -s "$1" "$2"' "$rc" "$work/out" "$work/big"

wait "$echo_pid"
rc=$?
check "unix: vsock-echo exits 0 after COUNT connections (exit $rc)" test "$rc" = 0
big=$((16 << 20))
{
    echo "vsock-echo: connection 1 of 7 from unix: echoed 6 bytes"
    echo "vsock-echo: connection 2 of 7 from unix: echoed 0 bytes"
    echo "vsock-echo: connection 3 of 7 from unix: echoed $big bytes"
    echo "vsock-echo: connection 4 of 7 from unix: echoed $big bytes"
    echo "vsock-echo: connection 5 of 7 from unix: echoed $(stat -c %s "$work/lines") bytes"
    echo "vsock-echo: connection 6 of 7 from unix: echoed $big bytes"
    echo "vsock-echo: connection 7 of 7 from unix: echoed $big bytes"
} >"$work/echo.want"
check "unix: vsock-echo stderr lines" bash -c 'diff -u "$0" "$1"' "$work/echo.want" "$work/echo.err"
check "unix: vsock-echo stdout is only the listening line" \
    bash -c '[[ $(cat "$0") == "vsock-echo: listening on 5000" ]]' "$work/echo.out"

# Peers written in Python: one that talks first and shuts its write side, then reads all of
# stdin; one that hangs up at once.
peer() { # peer MODE PORT: serves one connection; prints the byte count it read
    python3 - "$@" <<'EOF' &
import os, socket, sys
mode, port = sys.argv[1], sys.argv[2]
path = os.path.join(os.environ["VSOCK_TEST_UNIX_DIR"], "port-" + port)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
if mode == "hangup":
    c.close(); sys.exit(0)
c.sendall(b"greeting\n"); c.shutdown(socket.SHUT_WR)
n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    n += len(b)
print(n, flush=True)
EOF
}
peer first 5001 >"$work/peer.out"
pids+=($!)
check "unix: peer ready" wait_line "$work/peer.out" ready
"${T[@]}" "$work/unix-send" 5001 <"$work/big" >"$work/out" 2>"$work/err"
rc=$?
wait "${pids[-1]}"
check "unix: peer shuts its write side first, still gets all of stdin (exit $rc)" bash -c \
    '[[ $0 == 0 && $(cat "$1") == greeting && ! -s $2 && $(tail -n1 "$3") == $4 ]]' \
    "$rc" "$work/out" "$work/err" "$work/peer.out" "$big"

peer hangup 5002 >"$work/peer.out"
pids+=($!)
check "unix: peer ready" wait_line "$work/peer.out" ready
"${T[@]}" "$work/unix-send" 5002 <"$work/big" >"$work/out" 2>"$work/err"
rc=$?
check "unix: peer hangs up: exit 1 (exit $rc)" test "$rc" = 1
check "unix: peer hangs up: message" stderr_is "$work/err" \
    'vsock-send: (send to|recv from) 2:5002: (Broken pipe|Connection reset by peer)'

"${T[@]}" "$work/unix-send" 5003 7 </dev/null >"$work/out" 2>"$work/err"
rc=$?
check "unix: no listener: exit 1 (exit $rc)" test "$rc" = 1
check "unix: no listener: message" stderr_is "$work/err" 'vsock-send: connect to 7:5003: No such file or directory'

# --- both builds: usage ---
for p in "$work"/{vsock,unix}-{send,echo}; do
    for args in "" "x" "1 2 3" "-1" "4294967295" "5000 x"; do
        # shellcheck disable=SC2086
        "$p" $args </dev/null >/dev/null 2>"$work/err"
        rc=$?
        [[ $rc == 2 ]] && grep -q '^usage: ' "$work/err" || fail "usage: $(basename "$p") '$args' exit $rc"
    done
done
"$work/unix-echo" 5004 0 </dev/null >/dev/null 2>&1
[[ $? == 2 ]] || fail "usage: vsock-echo COUNT 0 accepted"
pass "usage errors exit 2"

# --- AF_VSOCK build: what this host allows ---
vport=$((20000 + RANDOM))
"$work/vsock-echo" $vport 1 >"$work/vecho.out" 2>"$work/vecho.err" &
vecho_pid=$!
pids+=("$vecho_pid")
sleep 0.3
if grep -q 'socket: Address family not supported' "$work/vecho.err"; then
    skip "vsock: this host has no AF_VSOCK"
else
    check "vsock: listening line" wait_line "$work/vecho.out" "vsock-echo: listening on $vport"
    "$work/vsock-echo" $vport >/dev/null 2>"$work/err"
    check "vsock: port in use: exit 1, message" stderr_is "$work/err" \
        "vsock-echo: bind to port $vport: Address already in use"
    # The host (CID 2) from here: refused or reset when this host is a guest, something else
    # when it is not; either way a message naming the call.
    timeout 10 "$work/vsock-send" $((vport + 1)) </dev/null >/dev/null 2>"$work/err"
    rc=$?
    check "vsock: connect to 2:$((vport + 1)) fails: exit 1 (exit $rc), message" bash -c \
        '[[ $0 == 1 ]] && grep -Eqx -- "$2" "$1"' "$rc" "$work/err" \
        "vsock-send: connect to 2:$((vport + 1)): .+"
    echo "     ($(cat "$work/err"))"
    # Loopback (VMADDR_CID_LOCAL): only some kernels have it (vsock_loopback).
    timeout 60 "$work/vsock-send" $vport 1 <"$work/big" >"$work/out" 2>"$work/err"
    rc=$?
    if [[ $rc == 0 ]]; then
        check "vsock: 16 MiB over loopback CID 1" same_bytes "$work/out" "$work/big"
        wait "$vecho_pid"
        check "vsock: vsock-echo exit 0 after loopback" test $? = 0
    else
        skip "vsock: no loopback on this host ($(cat "$work/err"))"
    fi
fi

if ((failures)); then
    echo "$failures check(s) FAILED"
    exit 1
fi
echo "all checks passed"
