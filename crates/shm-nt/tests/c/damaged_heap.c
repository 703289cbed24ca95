/* The C interface on a heap another process damaged: open it, check it, list it, allocate,
 * write and free. Every call must return (an error is fine); prints each error, with
 * "INTERNAL" when the library reports an internal error (a panic), then "done".
 *
 * Two helper modes make and damage the heap where no Rust driver runs (Windows, under Wine:
 * ci/windows/c_tests.sh), as tests/damage.rs does on Linux:
 *   damaged_heap build NAME RSIZE   a heap with 80 blocks, every second one freed, detached
 *   damaged_heap damage FILE SEED   1 to 6 random values written into the heap's object file
 *                                   (its header, not the lock word, or its first 64 KiB of
 *                                   blocks), each printed as OFFSET/WIDTH=VALUE */

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "shm_nt.h"

static void report(const char *what) {
    const char *e = shm_last_error();
    printf("%s: %s\n", what, e ? e : "(no message)");
    if (e && strstr(e, "internal error")) printf("INTERNAL\n");
}

/* As tests/damage.rs: the heap's lock word (a 96-byte RawMutex at 128) is left alone, blocks
 * start at AREA_OFFSET (16 KiB). */
#define LOCK_AT 128u
#define LOCK_END (128u + 96u)
#define AREA_OFFSET (16u << 10)

static uint64_t rng(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int build(const char *name, unsigned long rsize) {
    uintptr_t hdl = 0;
    if (shm_heap(name, rsize, &hdl, 0) != SHM_OK) {
        fprintf(stderr, "build: shm_heap: %s\n", shm_last_error());
        return 1;
    }
    void *blocks[80];
    for (unsigned long i = 0; i < 80; i++) {
        blocks[i] = shm_alloc(hdl, 16 + (i * 37) % 3000);
        if (blocks[i] == NULL) {
            fprintf(stderr, "build: shm_alloc: %s\n", shm_last_error());
            return 1;
        }
    }
    for (unsigned long i = 0; i < 80; i += 2) {
        if (shm_free(blocks[i]) != SHM_OK) return 1;
    }
    if (shm_heap_check(hdl) != SHM_OK) return 1;
    /* Detaches (thread caches flushed) before anyone damages the heap. */
    if (shm_exit() != SHM_OK) return 1;
    printf("built\n");
    return 0;
}

static int damage(const char *file, uint64_t seed) {
    FILE *f = fopen(file, "r+b");
    if (f == NULL) {
        perror(file);
        return 1;
    }
    uint64_t s = seed * 0x9e3779b97f4a7c15ull | 1;
    for (uint64_t n = 1 + rng(&s) % 6; n > 0; n--) {
        unsigned width = 1u << (rng(&s) % 4);
        uint64_t at;
        do {
            at = rng(&s) % 2 == 0 ? rng(&s) % (12u << 10) : AREA_OFFSET + rng(&s) % (64u << 10);
            at = at / width * width;
        } while (!(at + width <= LOCK_AT || at >= LOCK_END));
        uint64_t value;
        switch (rng(&s) % 5) {
        case 0: value = rng(&s); break;
        case 1: value = rng(&s) % 64; break;
        case 2: value = 1ull << 40; break;
        case 3: value = (rng(&s) % (1u << 16)) & ~15ull; break;
        default: value = UINT64_MAX;
        }
        unsigned char bytes[8];
        for (unsigned i = 0; i < 8; i++) bytes[i] = (unsigned char)(value >> (8 * i)); /* LE */
        if (fseek(f, (long)at, SEEK_SET) != 0 || fwrite(bytes, 1, width, f) != width) {
            perror("damage");
            return 1;
        }
        printf("%#llx/%u=%#llx%s", (unsigned long long)at, width, (unsigned long long)value, n > 1 ? "," : "\n");
    }
    return fclose(f) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "build") == 0) {
        unsigned long rsize = 0;
        if (sscanf(argv[3], "%lu", &rsize) != 1) return 2;
        return build(argv[2], rsize);
    }
    if (argc == 4 && strcmp(argv[1], "damage") == 0) {
        unsigned long long seed = 0;
        if (sscanf(argv[3], "%llu", &seed) != 1) return 2;
        return damage(argv[2], seed);
    }
    if (argc != 3) return 2;
    const char *name = argv[1];
    unsigned long rsize = 0;
    if (sscanf(argv[2], "%lu", &rsize) != 1) return 2;
    uintptr_t hdl = 0;
    int rc = shm_heap(name, rsize, &hdl, 0);
    if (rc != SHM_OK && rc != SHM_EXISTS) {
        report("shm_heap");
    } else {
        if (shm_heap_check(hdl) != SHM_OK) report("shm_heap_check");
#ifdef _WIN32
        FILE *null = fopen("NUL", "w");
#else
        FILE *null = fopen("/dev/null", "w");
#endif
        shm_list_heap(null, name);
        fclose(null);
        for (unsigned long i = 0; i < 40; i++) {
            unsigned long size = i % 5 == 4 ? 5000 + i * 997 : 1 + (i * 131) % 600;
            unsigned char *p = shm_alloc(hdl, size);
            if (p == NULL) {
                report("shm_alloc");
                continue;
            }
            memset(p, 0xa5, size);
            if (shm_free(p) != SHM_OK) report("shm_free");
        }
        if (shm_heap_check(hdl) != SHM_OK) report("shm_heap_check");
    }
    printf("done\n");
    shm_exit();
    return 0;
}
