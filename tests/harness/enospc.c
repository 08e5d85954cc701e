/* Test-only LD_PRELOAD shim: a full (or read-only) disk for some paths. Every write(2)/writev/pwrite
 * to a file whose path contains one of the ':'-separated strings in $MOE_DIST_FAULT_ENOSPC fails with
 * ENOSPC, as on a full filesystem (the file can still be created, as there). Built by
 * tests/harness/fault.py with the system C compiler; no root, no tmpfs needed.
 * $MOE_DIST_FAULT_ERRNO (a number, e.g. 30 = EROFS, 13 = EACCES) replaces ENOSPC; then, as on a
 * filesystem gone read-only or a folder without write permission, opening a matching path for
 * writing and mkdir of one fail too (root ignores permission bits, so a chmod cannot test this). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static int fault_errno(void) {
    const char *e = getenv("MOE_DIST_FAULT_ERRNO");
    return e && *e ? atoi(e) : ENOSPC;
}

static int matches(const char *path) {
    const char *needle = getenv("MOE_DIST_FAULT_ENOSPC");
    if (!needle || !*needle || !path) return 0;
    char list[1024];
    snprintf(list, sizeof list, "%s", needle);
    for (char *save = NULL, *tok = strtok_r(list, ":", &save); tok; tok = strtok_r(NULL, ":", &save))
        if (*tok && strstr(path, tok)) return 1;
    return 0;
}

static int full(int fd) {
    if (fd < 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return matches(path);
}

/* Creating or opening for writing fails only for a read-only / permission fault, not ENOSPC. */
static int refused(const char *path, int writing) {
    return writing && fault_errno() != ENOSPC && matches(path);
}
#define WRITING(flags) (((flags) & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)) != 0)
#define OPEN_SHIM(name, ...) \
    static int (*real)(__VA_ARGS__); \
    if (!real) real = dlsym(RTLD_NEXT, name); \
    mode_t mode = 0; \
    if (flags & O_CREAT) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); } \
    if (refused(path, WRITING(flags))) { errno = fault_errno(); return -1; }

int open(const char *path, int flags, ...) { OPEN_SHIM("open", const char *, int, ...) return real(path, flags, mode); }
int open64(const char *path, int flags, ...) { OPEN_SHIM("open64", const char *, int, ...) return real(path, flags, mode); }
int openat(int dirfd, const char *path, int flags, ...) {
    OPEN_SHIM("openat", int, const char *, int, ...) return real(dirfd, path, flags, mode);
}
int openat64(int dirfd, const char *path, int flags, ...) {
    OPEN_SHIM("openat64", int, const char *, int, ...) return real(dirfd, path, flags, mode);
}
int mkdir(const char *path, mode_t mode) {
    static int (*real)(const char *, mode_t);
    if (!real) real = dlsym(RTLD_NEXT, "mkdir");
    if (refused(path, 1)) { errno = fault_errno(); return -1; }
    return real(path, mode);
}
FILE *fopen(const char *path, const char *mode) {
    static FILE *(*real)(const char *, const char *);
    if (!real) real = dlsym(RTLD_NEXT, "fopen");
    if (refused(path, strpbrk(mode, "wa+") != NULL)) { errno = fault_errno(); return NULL; }
    return real(path, mode);
}
FILE *fopen64(const char *path, const char *mode) {
    static FILE *(*real)(const char *, const char *);
    if (!real) real = dlsym(RTLD_NEXT, "fopen64");
    if (refused(path, strpbrk(mode, "wa+") != NULL)) { errno = fault_errno(); return NULL; }
    return real(path, mode);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "write");
    if (count && full(fd)) { errno = fault_errno(); return -1; }
    return real(fd, buf, count);
}
ssize_t writev(int fd, const struct iovec *iov, int n) {
    static ssize_t (*real)(int, const struct iovec *, int);
    if (!real) real = dlsym(RTLD_NEXT, "writev");
    if (full(fd)) { errno = fault_errno(); return -1; }
    return real(fd, iov, n);
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite");
    if (count && full(fd)) { errno = fault_errno(); return -1; }
    return real(fd, buf, count, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    if (count && full(fd)) { errno = fault_errno(); return -1; }
    return real(fd, buf, count, off);
}
