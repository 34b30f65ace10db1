/* A container process trying to leave its root, for the end-to-end tests.
 *
 *   root-escape chroot   chroots into a directory below its root while its working directory
 *                        stays outside, then climbs ".." as far as the kernel lets it
 *                        (needs CAP_SYS_CHROOT);
 *   root-escape setns    detaches the mount on its root, then enters its own mount namespace
 *                        again, which puts it at the namespace's root mount and whatever is
 *                        mounted on top (needs CAP_SYS_ADMIN and CAP_SYS_CHROOT).
 *
 * Either way it then lists where it got to, one name a line. A container whose root was moved
 * over the guest's initramfs and chrooted into reaches the initramfs by the second way (the agent
 * as /init, the agent's own mounts); after pivot_root with the old root detached, and with the
 * initramfs emptied at boot, it reaches nothing of the agent.
 *
 * Built static by tests/build.rs: the test images have no C library. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

static int by_chroot(void)
{
    const char *inner = "/tmp/hull-root-escape";

    if (mkdir(inner, 0700) != 0 && errno != EEXIST) {
        perror("mkdir /tmp/hull-root-escape");
        return -1;
    }
    if (chroot(inner) != 0) {
        perror("chroot /tmp/hull-root-escape");
        return -1;
    }
    for (int i = 0; i < 64; i++) {
        if (chdir("..") != 0) {
            perror("chdir ..");
            return -1;
        }
    }
    return 0;
}

static int by_setns(void)
{
    int ns = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);

    if (ns < 0) {
        perror("open /proc/self/ns/mnt");
        return -1;
    }
    if (umount2("/", MNT_DETACH) != 0) {
        perror("umount2 / MNT_DETACH");
        return -1;
    }
    if (setns(ns, CLONE_NEWNS) != 0) {
        perror("setns mnt");
        return -1;
    }
    return chdir("/") == 0 ? 0 : (perror("chdir /"), -1);
}

int main(int argc, char **argv)
{
    if (argc != 2 || (strcmp(argv[1], "chroot") != 0 && strcmp(argv[1], "setns") != 0)) {
        fprintf(stderr, "usage: root-escape chroot|setns\n");
        return 2;
    }
    if ((strcmp(argv[1], "chroot") == 0 ? by_chroot() : by_setns()) != 0)
        return 1;
    DIR *dir = opendir(".");
    if (dir == NULL) {
        perror("opendir .");
        return 1;
    }
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0)
            puts(entry->d_name);
    }
    closedir(dir);
    return 0;
}
