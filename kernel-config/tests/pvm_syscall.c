/* Boot test for patches/0001 (run by ../boot-test.sh inside the guest).
 * Does what a PVM host does on `syscall`: enter entry_SYSCALL_64 in user mode
 * with RCX = return address and R11 = RFLAGS. On any other CPU (QEMU TCG here)
 * that page-faults exactly as on PVM, so the hull_pvm_syscall fixup can be
 * tested without a PVM host. Usage: pvm_syscall ENTRY_SYSCALL_64_HEX on|off */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

static unsigned long entry;

/* The "syscall" after the jmp is where a restart (ip -= 2) lands, as on PVM. */
static long pvm_syscall3(long nr, long a1, long a2, long a3, unsigned long extra_flags)
{
	long ret;
	asm volatile("lea 1f(%%rip), %%rcx\n\t"
		     "pushfq\n\t"
		     "pop %%r11\n\t"
		     "or %[xf], %%r11\n\t"
		     "jmp *%[entry]\n\t"
		     "syscall\n"
		     "1:"
		     : "=a"(ret)
		     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), [entry] "m"(entry), [xf] "r"(extra_flags)
		     : "rcx", "r11", "memory");
	return ret;
}
#define PS(nr, a, b, c) pvm_syscall3(nr, (long)(a), (long)(b), (long)(c), 0)

static volatile int got_signal;
static void on_signal(int sig) { got_signal = sig; }

static int failures;
static void check(int ok, const char *what)
{
	printf("pvm_syscall: %s: %s\n", ok ? "ok" : "FAIL", what);
	if (!ok)
		failures++;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: pvm_syscall ENTRY_SYSCALL_64_HEX on|off\n");
		return 2;
	}
	entry = strtoul(argv[1], NULL, 16);
	int enabled = strcmp(argv[2], "on") == 0;
	setvbuf(stdout, NULL, _IONBF, 0);

	if (!enabled) {
		/* Without the boot flag the patch is inert: the fault kills the task. */
		pid_t pid = fork();
		if (pid == 0) {
			PS(SYS_getpid, 0, 0, 0);
			_exit(0);
		}
		int st;
		waitpid(pid, &st, 0);
		check(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "without hull_pvm_syscall the fault is a SIGSEGV");
		return failures != 0;
	}

	check(PS(SYS_getpid, 0, 0, 0) == getpid(), "getpid through the #PF fixup");
	const char msg[] = "pvm_syscall: write through the #PF fixup\n";
	check(PS(SYS_write, 1, msg, sizeof(msg) - 1) == sizeof(msg) - 1, "write returns its length");
	check(PS(100000, 0, 0, 0) == -ENOSYS, "unknown syscall number gives -ENOSYS");

	/* RFLAGS come from R11 but IOPL must never reach user space. */
	unsigned long fl;
	pvm_syscall3(SYS_getpid, 0, 0, 0, 0x3000);
	asm volatile("pushfq; pop %0" : "=r"(fl));
	check((fl & 0x3000) == 0 && (fl & 0x200), "IOPL from R11 dropped, IF set");

	/* fork: the child returns through ret_from_fork with the copied pt_regs. */
	long pid = PS(SYS_fork, 0, 0, 0);
	if (pid == 0)
		_exit(42);
	int st = 0;
	waitpid(pid, &st, 0);
	check(pid > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 42, "fork: child returns 0 after the syscall, parent gets its pid");

	/* A signal delivered on the way out, then rt_sigreturn back to after the syscall. */
	signal(SIGUSR1, on_signal);
	check(PS(SYS_kill, getpid(), SIGUSR1, 0) == 0 && got_signal == SIGUSR1, "signal handler ran, rt_sigreturn returned");

	/* Restart: read() on an empty pipe, interrupted by SIGALRM with SA_RESTART. */
	int p[2];
	pipe(p);
	struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };
	sigaction(SIGALRM, &sa, NULL);
	if (fork() == 0) {
		usleep(300000);
		kill(getppid(), SIGALRM);
		usleep(300000);
		write(p[1], "x", 1);
		_exit(0);
	}
	char c = 0;
	got_signal = 0;
	long n = PS(SYS_read, p[0], &c, 1);
	wait(NULL);
	check(n == 1 && c == 'x' && got_signal == SIGALRM, "read interrupted by a signal restarts (ip -= 2) and completes");

	/* seccomp filters run on this path: getppid -> EPERM. */
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = 4, .filter = f };
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	check(PS(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) == 0, "seccomp filter installed through the fixup");
	check(PS(SYS_getppid, 0, 0, 0) == -EPERM, "seccomp filter applies to fixed-up syscalls");

	printf("pvm_syscall: %s\n", failures ? "FAILED" : "all passed");
	return failures != 0;
}
