/*
 * ymm-stress: do a process's vector registers survive context switches?
 *
 * usage: ymm-stress PROCS YIELDS
 *        ymm-stress --self-test
 *
 * Forks PROCS processes. Each one YIELDS times, in ONE inline-asm block (so the compiler cannot
 * touch a vector register in between): loads every vector register from a pattern unique to
 * (process, register, lane); calls sched_yield with a raw `syscall` instruction; stores every
 * register to a buffer. Then, in plain scalar C, it compares the buffer with the pattern and
 * counts the registers that changed, and among them those holding ANOTHER process's pattern
 * (state swapped between processes). The registers are ZMM0-31 if the CPU and OS have AVX-512F
 * (CPUID and XGETBV, read at run time), else YMM0-15.
 *
 * The parent prints one line and exits 0 only if nothing was corrupted and every child exited 0:
 *
 *   ymm-stress: PROCS=4 YIELDS=2000 width=256 corrupted=0 swapped=0
 *
 * Details (which process, the first bad register) go to stderr. Exit status: 0 clean, 1
 * corruption or a failed child, 2 bad usage or a CPU without AVX.
 *
 * --self-test proves the checker: 2 processes, 50 rounds, each round deliberately corrupting two
 * registers between the syscall and the store (one loses bits 255:128 / 511:128, as a kernel
 * that saves only the FXSAVE area would do; one is loaded with the other process's pattern). It
 * passes (exit 0) only if exactly 200 corrupted and 100 swapped registers are counted.
 *
 * Why: a guest kernel that saves only the FXSAVE area on a context switch keeps XMM0-15 but
 * not the upper halves, which user code running natively with AVX does use.
 *
 * Build: gcc -O2 -static -mavx2 -fno-tree-vectorize -o ymm-stress ymm_stress.c
 * (-fno-tree-vectorize keeps the checking code scalar, so it does not depend on the very
 * registers under test; the AVX-512 part has its own target attribute.)
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_REGS 32
#define MAX_LANES 8 /* 64-bit lanes of a 512-bit register */
#define MAX_PROCS 4096
#define MAX_YIELDS 100000000L

#define SELF_TEST_PROCS 2
#define SELF_TEST_YIELDS 50
#define SELF_TEST_BAD_PER_ROUND 2 /* registers corrupted per round */
#define SELF_TEST_SWAPPED_PER_ROUND 1

/* One slot per register, 64 bytes apart whatever the width: register n at n * 64. */
struct vecs {
    uint64_t lane[MAX_REGS][MAX_LANES];
} __attribute__((aligned(64)));

/* A lane's pattern: "YS" | process (16 bits) | 0 | 0xA5 | register | lane. */
#define PATTERN_TAG 0x5953ULL
#define PATTERN_MARK 0xA5ULL
#define POISON 0xDEADBEEFDEADBEEFULL

static uint64_t pattern_value(unsigned proc, unsigned reg, unsigned lane)
{
    return PATTERN_TAG << 48 | (uint64_t)proc << 24 | PATTERN_MARK << 16 | (uint64_t)reg << 8 |
           lane;
}

/* Whether `v` is some process's pattern for some register and lane; sets *proc if it is. */
static int decode_pattern(uint64_t v, unsigned nregs, unsigned lanes, unsigned procs,
                          unsigned *proc)
{
    unsigned p = (unsigned)(v >> 24 & 0xffff), reg = (unsigned)(v >> 8 & 0xff),
             lane = (unsigned)(v & 0xff);
    if (v >> 48 != PATTERN_TAG || (v >> 40 & 0xff) != 0 || (v >> 16 & 0xff) != PATTERN_MARK)
        return 0;
    if (p >= procs || reg >= nregs || lane >= lanes)
        return 0;
    *proc = p;
    return 1;
}

/* What a child reports to the parent, in shared memory. */
struct result {
    int done;
    uint64_t corrupted, swapped;
    int have_first;
    unsigned first_round, first_reg, first_lane;
    uint64_t first_got, first_want;
};

struct config {
    unsigned procs;
    long yields;
    unsigned width; /* 256 or 512 */
    int corrupt;    /* self-test: corrupt registers on purpose */
};

/* ---- The rounds: load, syscall, store, all in one asm block ---- */

#define R16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) \
    M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define R32(M) R16(M) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23) \
    M(24) M(25) M(26) M(27) M(28) M(29) M(30) M(31)

#define LOAD_Y(n) "vmovdqu " #n "*64(%[pat]), %%ymm" #n "\n\t"
#define STORE_Y(n) "vmovdqu %%ymm" #n ", " #n "*64(%[out])\n\t"
#define LOAD_Z(n) "vmovdqu64 " #n "*64(%[pat]), %%zmm" #n "\n\t"
#define STORE_Z(n) "vmovdqu64 %%zmm" #n ", " #n "*64(%[out])\n\t"

#define CLOBBER_XMM0_15 "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", \
    "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define CLOBBER_XMM16_31 "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", \
    "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

/*
 * `syscall` clobbers rax (the result), rcx and r11; the kernel may read and write memory. The
 * clobber list names every vector register, so the compiler keeps nothing of its own in them.
 * Returns sched_yield's result (0).
 */
static long __attribute__((noinline))
round256(const struct vecs *pat, struct vecs *out, const struct vecs *other, int corrupt)
{
    long nr = SYS_sched_yield;
    if (!corrupt) {
        __asm__ volatile(R16(LOAD_Y) "syscall\n\t" R16(STORE_Y)
                         : "+a"(nr)
                         : [pat] "r"(pat), [out] "r"(out)
                         : "rcx", "r11", "memory", CLOBBER_XMM0_15);
    } else {
        __asm__ volatile(R16(LOAD_Y) "syscall\n\t"
                         /* VEX.128 move: keeps bits 127:0, zeroes the upper half. */
                         "vmovdqa %%xmm7, %%xmm7\n\t"
                         /* The other process's register 9. */
                         "vmovdqu 9*64(%[other]), %%ymm9\n\t" R16(STORE_Y)
                         : "+a"(nr)
                         : [pat] "r"(pat), [out] "r"(out), [other] "r"(other)
                         : "rcx", "r11", "memory", CLOBBER_XMM0_15);
    }
    return nr;
}

static long __attribute__((noinline, target("avx512f")))
round512(const struct vecs *pat, struct vecs *out, const struct vecs *other, int corrupt)
{
    long nr = SYS_sched_yield;
    if (!corrupt) {
        __asm__ volatile(R32(LOAD_Z) "syscall\n\t" R32(STORE_Z)
                         : "+a"(nr)
                         : [pat] "r"(pat), [out] "r"(out)
                         : "rcx", "r11", "memory", CLOBBER_XMM0_15, CLOBBER_XMM16_31);
    } else {
        __asm__ volatile(R32(LOAD_Z) "syscall\n\t"
                         /* VEX.128 move: keeps bits 127:0, zeroes bits 511:128. */
                         "vmovdqa %%xmm7, %%xmm7\n\t"
                         /* The other process's register 20 (one only EVEX can reach). */
                         "vmovdqu64 20*64(%[other]), %%zmm20\n\t" R32(STORE_Z)
                         : "+a"(nr)
                         : [pat] "r"(pat), [out] "r"(out), [other] "r"(other)
                         : "rcx", "r11", "memory", CLOBBER_XMM0_15, CLOBBER_XMM16_31);
    }
    return nr;
}

/* ---- The checker: scalar, volatile reads, so it uses no vector register itself ---- */

static void fill_pattern(struct vecs *v, unsigned proc)
{
    for (unsigned r = 0; r < MAX_REGS; r++)
        for (unsigned l = 0; l < MAX_LANES; l++)
            ((volatile uint64_t *)v->lane[r])[l] = pattern_value(proc, r, l);
}

static void poison(struct vecs *v)
{
    for (unsigned r = 0; r < MAX_REGS; r++)
        for (unsigned l = 0; l < MAX_LANES; l++)
            ((volatile uint64_t *)v->lane[r])[l] = POISON;
}

static void check(const struct vecs *got, unsigned proc, const struct config *cfg, unsigned nregs,
                  unsigned lanes, unsigned round, struct result *res)
{
    for (unsigned r = 0; r < nregs; r++) {
        int bad = 0, foreign = 0;
        for (unsigned l = 0; l < lanes; l++) {
            uint64_t v = ((const volatile uint64_t *)got->lane[r])[l];
            uint64_t want = pattern_value(proc, r, l);
            unsigned other;
            if (v == want)
                continue;
            bad = 1;
            if (decode_pattern(v, nregs, lanes, cfg->procs, &other) && other != proc)
                foreign = 1;
            if (!res->have_first) {
                res->have_first = 1;
                res->first_round = round;
                res->first_reg = r;
                res->first_lane = l;
                res->first_got = v;
                res->first_want = want;
            }
        }
        res->corrupted += bad;
        res->swapped += foreign;
    }
}

/* One child's work. Returns its exit status. */
static int child(unsigned proc, const struct config *cfg, struct result *res)
{
    static struct vecs pat, other, out;
    unsigned nregs = cfg->width == 512 ? 32 : 16, lanes = cfg->width / 64;
    fill_pattern(&pat, proc);
    fill_pattern(&other, (proc + 1) % cfg->procs);
    for (long i = 0; i < cfg->yields; i++) {
        poison(&out);
        long ret = cfg->width == 512 ? round512(&pat, &out, &other, cfg->corrupt)
                                     : round256(&pat, &out, &other, cfg->corrupt);
        if (ret != 0) {
            fprintf(stderr, "ymm-stress: process %u: sched_yield returned %ld\n", proc, ret);
            return 1;
        }
        check(&out, proc, cfg, nregs, lanes, (unsigned)i, res);
    }
    res->done = 1;
    return 0;
}

/* ---- CPU features ---- */

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}

/* 512 with AVX-512F, 256 with AVX, 0 without; both need the OS to enable the state (XCR0). */
static unsigned vector_width(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int osxsave = c >> 27 & 1, avx = c >> 28 & 1;
    if (!osxsave || !avx)
        return 0;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) /* SSE and AVX state */
        return 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (b >> 16 & 1) &&
        (xcr0 & 0xe0) == 0xe0) /* opmask, ZMM_Hi256, Hi16_ZMM state */
        return 512;
    return 256;
}

/* ---- The parent ---- */

struct totals {
    uint64_t corrupted, swapped;
    int failed; /* children that did not exit 0 or did not report */
};

static int run(const struct config *cfg, struct totals *t)
{
    struct result *res = mmap(NULL, sizeof(*res) * cfg->procs, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t *pids = calloc(cfg->procs, sizeof(*pids));
    if (res == MAP_FAILED || !pids) {
        perror("ymm-stress: memory");
        return -1;
    }
    memset(t, 0, sizeof(*t));
    fflush(NULL);
    for (unsigned p = 0; p < cfg->procs; p++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("ymm-stress: fork");
            t->failed++;
            continue;
        }
        if (pid == 0) {
            int status = child(p, cfg, &res[p]);
            fflush(NULL);
            _exit(status);
        }
        pids[p] = pid;
    }
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: all collected */
        }
        unsigned p = 0;
        while (p < cfg->procs && pids[p] != pid)
            p++;
        if (p == cfg->procs)
            continue;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && res[p].done)
            continue;
        t->failed++;
        if (WIFSIGNALED(status))
            fprintf(stderr, "ymm-stress: process %u (pid %d) killed by signal %d\n", p, pid,
                    WTERMSIG(status));
        else
            fprintf(stderr, "ymm-stress: process %u (pid %d) exited with %d%s\n", p, pid,
                    WEXITSTATUS(status), res[p].done ? "" : " before finishing");
    }
    for (unsigned p = 0; p < cfg->procs; p++) {
        const struct result *r = &res[p];
        t->corrupted += r->corrupted;
        t->swapped += r->swapped;
        if (r->have_first && !cfg->corrupt)
            fprintf(stderr,
                    "ymm-stress: process %u: corrupted=%" PRIu64 " swapped=%" PRIu64
                    "; first in round %u: register %u lane %u is 0x%016" PRIx64
                    ", want 0x%016" PRIx64 "\n",
                    p, r->corrupted, r->swapped, r->first_round, r->first_reg, r->first_lane,
                    r->first_got, r->first_want);
    }
    printf("ymm-stress: PROCS=%u YIELDS=%ld width=%u corrupted=%" PRIu64 " swapped=%" PRIu64
           "\n",
           cfg->procs, cfg->yields, cfg->width, t->corrupted, t->swapped);
    fflush(stdout);
    munmap(res, sizeof(*res) * cfg->procs);
    free(pids);
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: ymm-stress PROCS YIELDS\n"
                    "       ymm-stress --self-test\n"
                    "PROCS 1..%d, YIELDS 1..%ld\n",
            MAX_PROCS, MAX_YIELDS);
    return 2;
}

static int parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        return 0;
    *out = v;
    return 1;
}

int main(int argc, char **argv)
{
    struct config cfg = {0};
    long procs, yields;
    if (argc == 2 && strcmp(argv[1], "--self-test") == 0) {
        cfg.procs = SELF_TEST_PROCS;
        cfg.yields = SELF_TEST_YIELDS;
        cfg.corrupt = 1;
    } else if (argc == 3 && parse_long(argv[1], 1, MAX_PROCS, &procs) &&
               parse_long(argv[2], 1, MAX_YIELDS, &yields)) {
        cfg.procs = (unsigned)procs;
        cfg.yields = yields;
    } else {
        return usage();
    }
    cfg.width = vector_width();
    if (cfg.width == 0) {
        fprintf(stderr, "ymm-stress: this CPU or OS has no AVX state (CPUID/XCR0): nothing to test\n");
        return 2;
    }

    struct totals t;
    if (run(&cfg, &t) != 0)
        return 1;
    if (!cfg.corrupt)
        return t.corrupted == 0 && t.failed == 0 ? 0 : 1;

    uint64_t rounds = (uint64_t)cfg.procs * (uint64_t)cfg.yields;
    uint64_t want_bad = rounds * SELF_TEST_BAD_PER_ROUND,
             want_swapped = rounds * SELF_TEST_SWAPPED_PER_ROUND;
    if (t.failed == 0 && t.corrupted == want_bad && t.swapped == want_swapped) {
        printf("ymm-stress: self-test passed: caught %" PRIu64 " corrupted and %" PRIu64
               " swapped registers, as planted\n",
               t.corrupted, t.swapped);
        return 0;
    }
    printf("ymm-stress: self-test FAILED: planted %" PRIu64 " corrupted and %" PRIu64
           " swapped registers, counted %" PRIu64 " and %" PRIu64 " (%d failed processes)\n",
           want_bad, want_swapped, t.corrupted, t.swapped, t.failed);
    return 1;
}
