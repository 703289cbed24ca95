/* The C interface on a heap another process damaged: open it, check it, list it, allocate,
 * write and free. Every call must return (an error is fine); prints each error, with
 * "INTERNAL" when the library reports an internal error (a panic), then "done". */

#include <stdio.h>
#include <string.h>

#include "shm_nt.h"

static void report(const char *what) {
    const char *e = shm_last_error();
    printf("%s: %s\n", what, e ? e : "(no message)");
    if (e && strstr(e, "internal error")) printf("INTERNAL\n");
}

int main(int argc, char **argv) {
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
        FILE *null = fopen("/dev/null", "w");
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
