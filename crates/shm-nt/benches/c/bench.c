/* The C interface's hot paths next to their references, one measurement per process run.
 * Driven by benches/c_interface.rs (`cargo bench -p shm-nt --bench c_interface`), which
 * compiles this file with `cc -O2` against the freshly built libshm_nt and runs it as
 * processes; each mode prints one line `key value` that the driver collects.
 *
 *   malloc SECS START_NS             glibc malloc/free pairs, 16 B-4 KiB mix, 64 live blocks
 *   malloc_threads SECS N            the same loop in N threads of one process (total pairs/s)
 *   mimalloc SECS START_NS           the same loop through mi_malloc/mi_free of the system's
 *                                    libmimalloc.so.2 (Debian libmimalloc2.0), loaded with dlopen;
 *                                    prints `mimalloc_missing 1` when it is not installed
 *   alloc SECS START_NS              shm_alloc/shm_free pairs, same mix, in heap "bench"
 *   realloc SECS START_NS            shm_realloc of a live block to the next size of the mix
 *   count_alloc N / count_malloc N   exactly N pairs (after the same warm-up) in counted_pairs(),
 *                                    for instruction counts: valgrind --tool=callgrind
 *                                    --toggle-collect=counted_pairs (see BENCHMARKS.md)
 *   pipe_send SIZE COUNT / (forks)   COUNT messages of SIZE bytes through a pipe, write/read
 *   q_send NAME SIZE COUNT           shm_q_write COUNT messages of SIZE bytes to queue NAME
 *   q_recv NAME SIZE COUNT           shm_q_read them; prints the receiver's messages/s
 *   count_queue SIZE N               one process, both ends of queue "cq": N shm_q_write, each
 *                                    followed by its shm_q_read, in counted_queue() (after 1000
 *                                    more), for instruction counts as count_alloc
 *   ping COUNT / pong                8-byte round trips through queues "ping" and "pong"; then
 *                                    PAUSES more, each after 100 ms of nothing: pong prints the
 *                                    CPU it used meanwhile (waiting in shm_q_read), ping the
 *                                    round trip that woke it
 *   sem_pair COUNT                   shm_sem_post + shm_sem_wait(0) pairs, one process
 *   memcpy SIZE                      memcpy bandwidth over a buffer of SIZE bytes
 *
 * Timed loops that two processes run at once start at the wall-clock time START_NS (so they
 * overlap exactly) and run for SECS seconds; the driver adds up their pairs per second.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shm_nt.h"

#define LIVE 64
#define NSIZES 4096

static size_t sizes[NSIZES];

static void make_sizes(void) {
    uint64_t x = 0x2545f4914f6cdd1dULL;
    for (int i = 0; i < NSIZES; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sizes[i] = 16 + (size_t)(x % 4081);
    }
}

static uint64_t now_ns(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "bench: %s failed: %s\n", what, shm_last_error());
    exit(1);
}

/* Waits until the wall clock reaches `start` (0: now). */
static void wait_start(uint64_t start) {
    while (start && now_ns(CLOCK_REALTIME) < start) {
    }
}

typedef void *(*alloc_fn)(void *ctx, size_t size);
typedef void (*free_fn)(void *ctx, void *p);

/* Pairs per CPU second of the last run_pairs in this thread (robust to a loaded machine: time
 * the thread was preempted does not count). */
static __thread double cpu_rate;

/* Replaces live blocks for `secs` seconds; returns pairs per (wall-clock) second. */
static double run_pairs(double secs, uint64_t start, alloc_fn a, free_fn f, void *ctx) {
    void *live[LIVE];
    for (int i = 0; i < LIVE; i++) live[i] = a(ctx, sizes[i]);
    /* Warm up (fills thread caches) before the clock starts. */
    for (uint64_t i = 0; i < 100000; i++) {
        f(ctx, live[i % LIVE]);
        live[i % LIVE] = a(ctx, sizes[i % NSIZES]);
    }
    wait_start(start);
    uint64_t c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    uint64_t t0 = now_ns(CLOCK_MONOTONIC), end = t0 + (uint64_t)(secs * 1e9), t = t0, n = 0;
    while (t < end) {
        for (int k = 0; k < 4096; k++, n++) {
            f(ctx, live[n % LIVE]);
            live[n % LIVE] = a(ctx, sizes[n % NSIZES]);
            __asm__ volatile("" ::"r"(live[n % LIVE]) : "memory");
        }
        t = now_ns(CLOCK_MONOTONIC);
    }
    cpu_rate = (double)n / ((double)(now_ns(CLOCK_THREAD_CPUTIME_ID) - c0) / 1e9);
    for (int i = 0; i < LIVE; i++) f(ctx, live[i]);
    return (double)n / ((double)(t - t0) / 1e9);
}

/* Exactly `count` pairs on `live`: the loop of run_pairs without the clock, kept out of line
 * so that callgrind can count only it. */
__attribute__((noinline)) void counted_pairs(uint64_t count, void **live, alloc_fn a, free_fn f, void *ctx) {
    for (uint64_t n = 0; n < count; n++) {
        f(ctx, live[n % LIVE]);
        live[n % LIVE] = a(ctx, sizes[n % NSIZES]);
        __asm__ volatile("" ::"r"(live[n % LIVE]) : "memory");
    }
}

static void count_pairs(uint64_t count, alloc_fn a, free_fn f, void *ctx) {
    void *live[LIVE];
    for (int i = 0; i < LIVE; i++) live[i] = a(ctx, sizes[i]);
    for (uint64_t i = 0; i < 100000; i++) {
        f(ctx, live[i % LIVE]);
        live[i % LIVE] = a(ctx, sizes[i % NSIZES]);
    }
    counted_pairs(count, live, a, f, ctx);
    for (int i = 0; i < LIVE; i++) f(ctx, live[i]);
    printf("pairs %llu\n", (unsigned long long)count);
}

static void *m_alloc(void *ctx, size_t size) {
    (void)ctx;
    void *p = malloc(size);
    if (!p) die("malloc");
    return p;
}
static void m_free(void *ctx, void *p) {
    (void)ctx;
    free(p);
}
static void *(*mi_malloc_fn)(size_t);
static void (*mi_free_fn)(void *);
static void *mi_alloc(void *ctx, size_t size) {
    (void)ctx;
    void *p = mi_malloc_fn(size);
    if (!p) die("mi_malloc");
    return p;
}
static void mi_free(void *ctx, void *p) {
    (void)ctx;
    mi_free_fn(p);
}
/* mimalloc's own entry points (not an override of malloc): 0 when it is not installed. */
static int load_mimalloc(void) {
    void *lib = dlopen("libmimalloc.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return 0;
    mi_malloc_fn = (void *(*)(size_t))dlsym(lib, "mi_malloc");
    mi_free_fn = (void (*)(void *))dlsym(lib, "mi_free");
    return mi_malloc_fn && mi_free_fn;
}
static void *s_alloc(void *ctx, size_t size) {
    void *p = shm_alloc(*(uintptr_t *)ctx, size);
    if (!p) die("shm_alloc");
    return p;
}
static void s_free(void *ctx, void *p) {
    (void)ctx;
    if (shm_free(p) != SHM_OK) die("shm_free");
}

struct thread_arg {
    double secs;
    uint64_t start;
    double rate, cpu_rate;
};

static void *malloc_thread(void *p) {
    struct thread_arg *a = p;
    a->rate = run_pairs(a->secs, a->start, m_alloc, m_free, NULL);
    a->cpu_rate = cpu_rate;
    return NULL;
}

static uintptr_t bench_heap(void) {
    uintptr_t h;
    int rc = shm_heap("bench", 256UL << 20, &h, 0);
    if (rc < 0) die("shm_heap");
    return h;
}

static void realloc_loop(double secs, uint64_t start) {
    uintptr_t h = bench_heap();
    void *live[LIVE];
    for (int i = 0; i < LIVE; i++) live[i] = s_alloc(&h, sizes[i]);
    wait_start(start);
    uint64_t t0 = now_ns(CLOCK_MONOTONIC), end = t0 + (uint64_t)(secs * 1e9), t = t0, n = 0;
    while (t < end) {
        for (int k = 0; k < 4096; k++, n++) {
            void *p = shm_realloc(live[n % LIVE], sizes[n % NSIZES]);
            if (!p) die("shm_realloc");
            live[n % LIVE] = p;
        }
        t = now_ns(CLOCK_MONOTONIC);
    }
    for (int i = 0; i < LIVE; i++) s_free(&h, live[i]);
    printf("realloc_per_s %.0f\n", (double)n / ((double)(t - t0) / 1e9));
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) die("write");
        p += w;
        n -= (size_t)w;
    }
}

static void read_all(int fd, char *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("read");
        p += r;
        n -= (size_t)r;
    }
}

/* Messages per second through a pipe between two processes, measured by the reader. */
static void pipe_rate(size_t size, uint64_t count) {
    int fds[2];
    if (pipe(fds)) die("pipe");
    pid_t child = fork();
    if (child == 0) {
        close(fds[0]);
        char *msg = calloc(1, size);
        for (uint64_t i = 0; i < count + 1; i++) write_all(fds[1], msg, size);
        _exit(0);
    }
    close(fds[1]);
    char *buf = malloc(size);
    read_all(fds[0], buf, size); /* the first message starts the clock */
    uint64_t t0 = now_ns(CLOCK_MONOTONIC);
    for (uint64_t i = 0; i < count; i++) read_all(fds[0], buf, size);
    uint64_t t = now_ns(CLOCK_MONOTONIC) - t0;
    waitpid(child, NULL, 0);
    printf("msgs_per_s %.0f\n", (double)count / ((double)t / 1e9));
}

static uintptr_t open_queue(const char *name, size_t cap) {
    uintptr_t q;
    if (shm_queue(name, cap, &q) < 0) die("shm_queue");
    return q;
}

static void q_send(const char *name, size_t size, uint64_t count) {
    uintptr_t q = open_queue(name, 1UL << 20);
    char *msg = calloc(1, size);
    for (uint64_t i = 0; i < count + 1; i++) {
        memcpy(msg, &i, sizeof i);
        if (shm_q_write(q, msg, size, -1) != SHM_OK) die("shm_q_write");
    }
    /* Stay until the receiver has everything (a leaving sender is fine too, but keep it simple). */
    shm_exit();
}

static void q_recv(const char *name, size_t size, uint64_t count) {
    uintptr_t q = open_queue(name, 1UL << 20);
    char *buf = malloc(size);
    if (shm_q_read(q, buf, size, -1) != (long)size) die("shm_q_read");
    uint64_t t0 = now_ns(CLOCK_MONOTONIC);
    for (uint64_t i = 1; i <= count; i++) {
        long n = shm_q_read(q, buf, size, -1);
        if (n != (long)size) die("shm_q_read");
        uint64_t v;
        memcpy(&v, buf, sizeof v);
        if (v != i) {
            fprintf(stderr, "bench: message %llu arrived as %llu\n", (unsigned long long)i, (unsigned long long)v);
            exit(1);
        }
    }
    uint64_t t = now_ns(CLOCK_MONOTONIC) - t0;
    printf("msgs_per_s %.0f\n", (double)count / ((double)t / 1e9));
    shm_exit();
}

/* `count` messages of `size` bytes written and each read back, one process at both ends: the
 * calls' own instructions, without waiting (count_queue). */
__attribute__((noinline)) void counted_queue(uintptr_t q, char *msg, char *buf, size_t size, uint64_t count) {
    for (uint64_t i = 0; i < count; i++) {
        if (shm_q_write(q, msg, size, -1) != SHM_OK) die("shm_q_write");
        if (shm_q_read(q, buf, size, -1) != (long)size) die("shm_q_read");
    }
}

static void count_queue(size_t size, uint64_t count) {
    uintptr_t q = open_queue("cq", 1UL << 20);
    char *msg = calloc(1, size), *buf = malloc(size);
    counted_queue(q, msg, buf, size, 1000);
    counted_queue(q, msg, buf, size, count);
    printf("messages %llu\n", (unsigned long long)count);
    shm_exit();
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Round trips after a 100 ms pause, in `ping`. */
#define PAUSES 5

static void ping(uint64_t count) {
    uintptr_t to = open_queue("ping", 64 << 10), from = open_queue("pong", 64 << 10);
    uint64_t *rtt = malloc(count * sizeof *rtt);
    char msg[8] = {0}, buf[8];
    for (uint64_t i = 0; i < count + 10000; i++) {
        uint64_t t0 = now_ns(CLOCK_MONOTONIC);
        if (shm_q_write(to, msg, 8, -1) != SHM_OK) die("shm_q_write");
        if (shm_q_read(from, buf, 8, -1) != 8) die("shm_q_read");
        uint64_t t = now_ns(CLOCK_MONOTONIC) - t0;
        if (i >= 10000) rtt[i - 10000] = t;
    }
    qsort(rtt, count, sizeof *rtt, cmp_u64);
    printf("rtt_median_ns %llu\nrtt_p99_ns %llu\n", (unsigned long long)rtt[count / 2],
           (unsigned long long)rtt[count * 99 / 100]);
    /* The pauses: pong starts counting its CPU time (2), then PAUSES round trips each after
     * 100 ms of nothing, in which pong waits in shm_q_read. */
    msg[0] = 2;
    if (shm_q_write(to, msg, 8, -1) != SHM_OK) die("shm_q_write");
    if (shm_q_read(from, buf, 8, -1) != 8) die("shm_q_read");
    msg[0] = 0;
    uint64_t woke[PAUSES];
    for (int i = 0; i < PAUSES; i++) {
        usleep(100000);
        uint64_t t0 = now_ns(CLOCK_MONOTONIC);
        if (shm_q_write(to, msg, 8, -1) != SHM_OK) die("shm_q_write");
        if (shm_q_read(from, buf, 8, -1) != 8) die("shm_q_read");
        woke[i] = now_ns(CLOCK_MONOTONIC) - t0;
    }
    qsort(woke, PAUSES, sizeof *woke, cmp_u64);
    printf("woken_rtt_median_ns %llu\n", (unsigned long long)woke[PAUSES / 2]);
    msg[0] = 1; /* stop */
    if (shm_q_write(to, msg, 8, -1) != SHM_OK) die("shm_q_write");
    shm_exit();
}

static void pong(void) {
    uintptr_t from = open_queue("ping", 64 << 10), to = open_queue("pong", 64 << 10);
    char buf[8];
    uint64_t cpu0 = 0, wall0 = 0;
    for (;;) {
        if (shm_q_read(from, buf, 8, -1) != 8) die("shm_q_read");
        if (buf[0] == 1) break;
        if (buf[0] == 2) { /* ping pauses from now on: count our CPU time until the stop */
            cpu0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
            wall0 = now_ns(CLOCK_MONOTONIC);
        }
        if (shm_q_write(to, buf, 8, -1) != SHM_OK) die("shm_q_write");
    }
    if (wall0) {
        double cpu = (double)(now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0), wall = (double)(now_ns(CLOCK_MONOTONIC) - wall0);
        printf("paused_cpu_percent %.3f\n", 100.0 * cpu / wall);
    }
    shm_exit();
}

static void sem_pair(uint64_t count) {
    uintptr_t s;
    if (shm_sem("bench.sem", 0, &s) < 0) die("shm_sem");
    uint64_t t0 = now_ns(CLOCK_MONOTONIC);
    for (uint64_t i = 0; i < count; i++) {
        if (shm_sem_post(s) != SHM_OK) die("shm_sem_post");
        if (shm_sem_wait(s, 0) != SHM_OK) die("shm_sem_wait");
    }
    uint64_t t = now_ns(CLOCK_MONOTONIC) - t0;
    printf("sem_pairs_per_s %.0f\n", (double)count / ((double)t / 1e9));
    if (shm_sem_delete(s) != SHM_OK) die("shm_sem_delete");
}

static void memcpy_rate(size_t size) {
    char *a = malloc(size), *b = malloc(size);
    memset(a, 1, size);
    memset(b, 2, size);
    uint64_t reps = (1ULL << 32) / size + 1, t0 = now_ns(CLOCK_MONOTONIC);
    for (uint64_t i = 0; i < reps; i++) {
        memcpy(i & 1 ? a : b, i & 1 ? b : a, size);
        __asm__ volatile("" ::"r"(a), "r"(b) : "memory");
    }
    uint64_t t = now_ns(CLOCK_MONOTONIC) - t0;
    printf("bytes_per_s %.0f\n", (double)reps * (double)size / ((double)t / 1e9));
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench MODE ARGS (see the comment at the top of bench.c)\n");
        return 2;
    }
    make_sizes();
    const char *m = argv[1];
    double secs = argc > 2 ? atof(argv[2]) : 0;
    uint64_t start = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
    if (!strcmp(m, "malloc")) {
        printf("pairs_per_s %.0f\n", run_pairs(secs, start, m_alloc, m_free, NULL));
        printf("pairs_per_cpu_s %.0f\n", cpu_rate);
    } else if (!strcmp(m, "mimalloc")) {
        if (!load_mimalloc()) {
            printf("mimalloc_missing 1\npairs_per_s 0\npairs_per_cpu_s 0\n");
            return 0;
        }
        printf("pairs_per_s %.0f\n", run_pairs(secs, start, mi_alloc, mi_free, NULL));
        printf("pairs_per_cpu_s %.0f\n", cpu_rate);
    } else if (!strcmp(m, "malloc_threads")) {
        int n = (int)start;
        pthread_t t[16];
        struct thread_arg a[16];
        uint64_t at = now_ns(CLOCK_REALTIME) + 300000000ULL;
        for (int i = 0; i < n; i++) {
            a[i] = (struct thread_arg){secs, at, 0, 0};
            pthread_create(&t[i], NULL, malloc_thread, &a[i]);
        }
        double total = 0, cpu_total = 0;
        for (int i = 0; i < n; i++) {
            pthread_join(t[i], NULL);
            total += a[i].rate;
            cpu_total += a[i].cpu_rate;
        }
        printf("pairs_per_s %.0f\npairs_per_cpu_s %.0f\n", total, cpu_total);
    } else if (!strcmp(m, "alloc")) {
        uintptr_t h = bench_heap();
        printf("pairs_per_s %.0f\n", run_pairs(secs, start, s_alloc, s_free, &h));
        printf("pairs_per_cpu_s %.0f\n", cpu_rate);
        shm_exit();
    } else if (!strcmp(m, "count_malloc") && argc > 2) {
        count_pairs(strtoull(argv[2], NULL, 10), m_alloc, m_free, NULL);
    } else if (!strcmp(m, "count_alloc") && argc > 2) {
        uintptr_t h = bench_heap();
        count_pairs(strtoull(argv[2], NULL, 10), s_alloc, s_free, &h);
        shm_exit();
    } else if (!strcmp(m, "realloc")) {
        realloc_loop(secs, start);
        shm_exit();
    } else if (!strcmp(m, "pipe") && argc > 3) {
        pipe_rate((size_t)atol(argv[2]), strtoull(argv[3], NULL, 10));
    } else if (!strcmp(m, "q_send") && argc > 4) {
        q_send(argv[2], (size_t)atol(argv[3]), strtoull(argv[4], NULL, 10));
    } else if (!strcmp(m, "q_recv") && argc > 4) {
        q_recv(argv[2], (size_t)atol(argv[3]), strtoull(argv[4], NULL, 10));
    } else if (!strcmp(m, "count_queue") && argc > 3) {
        count_queue((size_t)atol(argv[2]), strtoull(argv[3], NULL, 10));
    } else if (!strcmp(m, "ping") && argc > 2) {
        ping(strtoull(argv[2], NULL, 10));
    } else if (!strcmp(m, "pong")) {
        pong();
    } else if (!strcmp(m, "sem_pair") && argc > 2) {
        sem_pair(strtoull(argv[2], NULL, 10));
        shm_exit();
    } else if (!strcmp(m, "memcpy") && argc > 2) {
        memcpy_rate((size_t)atol(argv[2]));
    } else {
        fprintf(stderr, "bench: unknown mode %s\n", m);
        return 2;
    }
    return 0;
}
