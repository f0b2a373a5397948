/* Counts heap allocations of a process: LD_PRELOAD it with PYTHONMALLOC=malloc, so every Python
 * object allocation goes through malloc too (Go's "bytes allocated" is the figure it is compared with).
 * Bytes = every malloc/calloc/memalign size plus what a realloc adds beyond the block's usable size
 * (a buffer grown in place a little at a time is not counted again whole each time); realloc_full
 * counts each realloc's whole new size instead (an upper bound).
 * On SIGRTMIN+4 (and at exit) it appends "<pid> <bytes> <calls> <realloc_full>\n" to $ALLOCSHIM_OUT (the pid:
 * the tools reaper runs, e.g. smartctl, inherit the shim and dump at their exit too). A real-time signal,
 * since reaper handles SIGUSR2 itself (it writes its status file then): bench/measure.py ALLOC_SIGNAL.
 * Built by bench/measure.py. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static unsigned long long total_bytes, total_calls, realloc_full;

static inline void count(size_t n) {
    __atomic_add_fetch(&total_bytes, (unsigned long long)n, __ATOMIC_RELAXED);
    __atomic_add_fetch(&total_calls, 1ULL, __ATOMIC_RELAXED);
}

void *malloc(size_t n) { count(n); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { count(a * b); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) {
    size_t have = p ? malloc_usable_size(p) : 0;
    count(n > have ? n - have : 0);
    __atomic_add_fetch(&realloc_full, (unsigned long long)n, __ATOMIC_RELAXED);
    return __libc_realloc(p, n);
}
void *memalign(size_t al, size_t n) { count(n); return __libc_memalign(al, n); }
void *aligned_alloc(size_t al, size_t n) { count(n); return __libc_memalign(al, n); }
int posix_memalign(void **out, size_t al, size_t n) {
    count(n);
    void *p = __libc_memalign(al, n);
    if (!p) return 12; /* ENOMEM */
    *out = p;
    return 0;
}

static int fmt(char *buf, unsigned long long v) { /* async-signal-safe decimal */
    char tmp[24]; int n = 0, i = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) buf[i++] = tmp[--n];
    return i;
}

static void dump(void) {
    const char *path = getenv("ALLOCSHIM_OUT");
    if (!path) return;
    char buf[128]; int n = fmt(buf, (unsigned long long)getpid());
    buf[n++] = ' ';
    n += fmt(buf + n, __atomic_load_n(&total_bytes, __ATOMIC_RELAXED));
    buf[n++] = ' ';
    n += fmt(buf + n, __atomic_load_n(&total_calls, __ATOMIC_RELAXED));
    buf[n++] = ' ';
    n += fmt(buf + n, __atomic_load_n(&realloc_full, __ATOMIC_RELAXED));
    buf[n++] = '\n';
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) { ssize_t w = write(fd, buf, (size_t)n); (void)w; close(fd); }
}

static void on_signal(int sig) { (void)sig; dump(); }

__attribute__((constructor)) static void init(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGRTMIN + 4, &sa, NULL);
}

__attribute__((destructor)) static void fini(void) { dump(); }
