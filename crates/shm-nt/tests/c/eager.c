/* Eager mode (SHMGADGET_EAGER=1: no fault handler) from C: shm_free and shm_realloc of blocks
 * of a heap created by another process after this one attached. Reads "ADDR_A ADDR_B LEN" on
 * stdin; block B holds bytes i % 251 for i < LEN.
 *
 * `eager late LEN` is the other side where no Rust driver runs (Windows, under Wine:
 * ci/windows/c_tests.sh), as tests/eager.rs does on Linux: a process that is not eager
 * creates the heap "late" (16 MiB) after the eager one attached, allocates A (64 bytes) and
 * B (LEN bytes of i % 251) and prints "ADDR_A ADDR_B LEN". */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shm_nt.h"

static int late(const char *len_text) {
    unsigned long len = strtoul(len_text, NULL, 10);
    uintptr_t heap = 0;
    if (len == 0 || shm_heap("late", 16UL << 20, &heap, 0) != SHM_OK) {
        fprintf(stderr, "late: shm_heap: %s\n", shm_last_error());
        return 1;
    }
    unsigned char *a = shm_alloc(heap, 64), *b = shm_alloc(heap, len);
    if (a == NULL || b == NULL) {
        fprintf(stderr, "late: shm_alloc: %s\n", shm_last_error());
        return 1;
    }
    for (unsigned long i = 0; i < len; i++) b[i] = (unsigned char)(i % 251);
    printf("%#llx %#llx %lu\n", (unsigned long long)(uintptr_t)a, (unsigned long long)(uintptr_t)b, len);
    return shm_exit() == SHM_OK ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "late") == 0) return late(argv[2]);
    uintptr_t anchor = 0;
    /* The first call attaches the domain (eager, from the environment). */
    int rc = shm_section("anchor", 4096, &anchor);
    if (rc != SHM_OK && rc != SHM_EXISTS) {
        fprintf(stderr, "shm_section: %d %s\n", rc, shm_last_error());
        return 1;
    }
    printf("READY\n");
    fflush(stdout);

    unsigned long long a = 0, b = 0;
    unsigned long len = 0;
    if (scanf("%llx %llx %lu", &a, &b, &len) != 3) {
        fprintf(stderr, "expected two addresses and a length on stdin\n");
        return 2;
    }
    rc = shm_free((void *)(uintptr_t)a);
    if (rc != SHM_OK) {
        fprintf(stderr, "shm_free: %d %s\n", rc, shm_last_error());
        return 3;
    }
    unsigned char *p = shm_realloc((void *)(uintptr_t)b, 100000);
    if (p == NULL) {
        fprintf(stderr, "shm_realloc: %s\n", shm_last_error());
        return 4;
    }
    for (unsigned long i = 0; i < len; i++) {
        if (p[i] != (unsigned char)(i % 251)) {
            fprintf(stderr, "byte %lu is %u after realloc, expected %lu\n", i, p[i], i % 251);
            return 5;
        }
    }
    rc = shm_free(p);
    if (rc != SHM_OK) {
        fprintf(stderr, "shm_free after realloc: %d %s\n", rc, shm_last_error());
        return 6;
    }
    printf("eager ok\n");
    return shm_exit() == SHM_OK ? 0 : 7;
}
