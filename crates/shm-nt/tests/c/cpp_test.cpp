// The header from C++: a heap, a few objects, the listings.
#include <cstdio>
#include <cstring>

#include "shm_nt.h"

struct Point {
    double x, y;
};

int main() {
    uintptr_t heap = 0;
    if (shm_heap("cpp.heap", 1UL << 20, &heap, 0) != SHM_OK) {
        std::fprintf(stderr, "shm_heap: %s\n", shm_last_error());
        return 1;
    }
    Point *pts = static_cast<Point *>(shm_alloc(heap, 100 * sizeof(Point)));
    if (pts == nullptr) return 1;
    for (int i = 0; i < 100; i++) pts[i] = Point{double(i), double(2 * i)};
    double sum = 0;
    for (int i = 0; i < 100; i++) sum += pts[i].y;
    if (shm_free(pts) != SHM_OK || sum != 9900.0) return 1;
    if (shm_heap_check(heap) != SHM_OK) return 1;
    shm_list_pools();
    if (shm_delete_section(heap) != SHM_OK) return 1;
    std::printf("c++ ok\n");
    return shm_exit() == SHM_OK ? 0 : 1;
}
