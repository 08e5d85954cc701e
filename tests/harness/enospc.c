/* Test-only LD_PRELOAD shim: a full disk for some paths. Every write(2)/writev/pwrite to a file
 * whose path contains one of the ':'-separated strings in $MOE_DIST_FAULT_ENOSPC fails with ENOSPC,
 * as on a full filesystem (the file can still be created, as there). Built by
 * tests/fault_harness.py with the system C compiler; no root, no tmpfs needed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static int full(int fd) {
    const char *needle = getenv("MOE_DIST_FAULT_ENOSPC");
    if (!needle || !*needle || fd < 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    char list[1024];
    snprintf(list, sizeof list, "%s", needle);
    for (char *save = NULL, *tok = strtok_r(list, ":", &save); tok; tok = strtok_r(NULL, ":", &save))
        if (*tok && strstr(path, tok)) return 1;
    return 0;
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "write");
    if (count && full(fd)) { errno = ENOSPC; return -1; }
    return real(fd, buf, count);
}
ssize_t writev(int fd, const struct iovec *iov, int n) {
    static ssize_t (*real)(int, const struct iovec *, int);
    if (!real) real = dlsym(RTLD_NEXT, "writev");
    if (full(fd)) { errno = ENOSPC; return -1; }
    return real(fd, iov, n);
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite");
    if (count && full(fd)) { errno = ENOSPC; return -1; }
    return real(fd, buf, count, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    if (count && full(fd)) { errno = ENOSPC; return -1; }
    return real(fd, buf, count, off);
}
