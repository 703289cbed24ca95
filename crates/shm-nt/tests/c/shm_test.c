/* C programs over libshm_nt, one mode per process (run by tests/c.rs). */
#define _DEFAULT_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
/* Windows (mingw, run under Wine by .ci/windows): no fork, no uids; threads and the occupied
 * window through the Win32 API. */
#include <windows.h>
#else
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "shm_nt.h"

#define NODES 100000UL

struct node {
    struct node *next;
    unsigned long value;
};

struct root {
    struct node *head;
    unsigned long count;
    unsigned long sum;
};

static int failures = 0;

#define EXPECT(cond)                                                                        \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "%s:%d: expected %s (last error: %s)\n", __FILE__, __LINE__, #cond, \
                    shm_last_error());                                                      \
            failures++;                                                                     \
        }                                                                                   \
    } while (0)

/* Builds a list of NODES nodes in a heap and publishes its head in a raw section. */
static void build(void) {
    uintptr_t heap, sec;
    EXPECT(shm_heap("list.heap", 64UL << 20, &heap, 0) == SHM_OK);
    EXPECT(shm_section("list.root", 4096, &sec) == SHM_OK);
    struct root *r = (struct root *)sec;
    struct node *head = NULL;
    unsigned long sum = 0;
    for (unsigned long i = 0; i < NODES; i++) {
        struct node *n = shm_alloc(heap, sizeof *n);
        if (n == NULL) {
            fprintf(stderr, "shm_alloc failed: %s\n", shm_last_error());
            exit(1);
        }
        n->value = i * 7 + 1;
        n->next = head;
        head = n;
        sum += n->value;
    }
    r->head = head;
    r->count = NODES;
    r->sum = sum;
    printf("built %lu nodes in heap %#llx, root in %#llx\n", NODES, (unsigned long long)heap, (unsigned long long)sec);
}

/* Walks the list through plain pointers (the heap is mapped on first touch), frees it. */
static void walk(void) {
    uintptr_t sec, heap;
    EXPECT(shm_map("list.root", 0, &sec) == SHM_OK);
    struct root *r = (struct root *)sec;
    unsigned long count = 0, sum = 0;
    for (struct node *n = r->head; n != NULL;) {
        struct node *next = n->next;
        sum += n->value;
        count++;
        EXPECT(shm_free(n) == SHM_OK);
        n = next;
    }
    EXPECT(count == r->count);
    EXPECT(sum == r->sum);
    r->head = NULL;
    EXPECT(shm_map("list.heap", 0, &heap) == SHM_OK);
    EXPECT(shm_heap_check(heap) == SHM_OK);
    printf("walked %lu nodes, sum ok, heap consistent\n", count);
}

/* Receives messages until the writer is gone. */
static void reader(void) {
    uintptr_t q, ready;
    int rc = shm_queue("msgs", 64 << 10, &q);
    EXPECT(rc == SHM_OK || rc == SHM_EXISTS);
    rc = shm_sem("ready", 0, &ready);
    EXPECT(rc == SHM_OK || rc == SHM_EXISTS);
    char small[2], buf[64];
    EXPECT(shm_q_read(q, buf, sizeof buf, 0) == SHM_ERR_TIMEOUT); /* nothing yet */
    EXPECT(shm_sem_post(ready) == SHM_OK);
    /* Too small a buffer: an error, and the message stays queued. */
    EXPECT(shm_q_read(q, small, sizeof small, 10000) == SHM_ERR_INVALID);
    long expected = 0;
    intptr_t n;
    while ((n = shm_q_read(q, buf, sizeof buf, 10000)) >= 0) {
        char want[64];
        snprintf(want, sizeof want, "message %ld", expected);
        EXPECT(n == (intptr_t)strlen(want) + 1 && strcmp(buf, want) == 0);
        expected++;
    }
    EXPECT(n == SHM_ERR_DISCONNECTED);
    printf("received %ld messages, then disconnected\n", expected);
}

static void writer(void) {
    uintptr_t q, ready;
    int rc = shm_queue("msgs", 64 << 10, &q);
    EXPECT(rc == SHM_OK || rc == SHM_EXISTS);
    rc = shm_sem("ready", 0, &ready);
    EXPECT(rc == SHM_OK || rc == SHM_EXISTS);
    EXPECT(shm_sem_wait(ready, 10000) == SHM_OK);
    for (long i = 0; i < 1000; i++) {
        char msg[64];
        snprintf(msg, sizeof msg, "message %ld", i);
        EXPECT(shm_q_write(q, msg, strlen(msg) + 1, -1) == SHM_OK);
    }
    printf("sent 1000 messages\n");
}

/* Every error code, from a C caller. */
static void errors(void) {
    uintptr_t h, a, s, q, heap;
    /* SHM_ERR_INVALID: NULLs, bad names, bad handles, a too large rsize for shm_map. */
    EXPECT(shm_section(NULL, 4096, &h) == SHM_ERR_INVALID);
    EXPECT(shm_section("ok", 4096, NULL) == SHM_ERR_INVALID);
    EXPECT(shm_section("bad/name", 4096, &h) == SHM_ERR_INVALID);
    EXPECT(shm_section("zero", 0, &h) == SHM_ERR_INVALID);
    EXPECT(shm_free(NULL) == SHM_ERR_INVALID);
    EXPECT(shm_alloc(12345, 16) == NULL);
    EXPECT(strlen(shm_last_error()) > 0);
    EXPECT(shm_section("small", 4096, &s) == SHM_OK);
    printf("small at %#llx\n", (unsigned long long)s);
    EXPECT(shm_section("small", 4096, &a) == SHM_EXISTS && a == s);
    EXPECT(shm_map("small", 1 << 20, &a) == SHM_ERR_INVALID);
    EXPECT(shm_heap_check(s) == SHM_ERR_INVALID); /* a raw section is not a heap */
    EXPECT(shm_q_write(12345, "x", 1, 0) == SHM_ERR_INVALID);
    EXPECT(shm_sem_post(s) == SHM_ERR_INVALID);
    /* SHM_ERR_NOT_FOUND. */
    EXPECT(shm_map("missing", 0, &a) == SHM_ERR_NOT_FOUND);
    /* SHM_ERR_NO_MEMORY: two sections of 700 GiB do not fit one 1 TiB window. */
    int huge = shm_section("huge1", (size_t)700 << 30, &a);
#ifdef _WIN32
    /* Wine cannot map a 700 GiB view at all (ERROR_NOT_ENOUGH_MEMORY): no memory for it is
     * the same code as no room in the window, and nothing of it is left behind. */
    if (huge == SHM_ERR_NO_MEMORY) {
        printf("huge: a 700 GiB view does not fit here: %s\n", shm_last_error());
        EXPECT(shm_map("huge1", 0, &a) == SHM_ERR_NOT_FOUND);
        EXPECT(shm_section("huge2", (size_t)700 << 30, &a) == SHM_ERR_NO_MEMORY);
        EXPECT(shm_map("huge2", 0, &a) == SHM_ERR_NOT_FOUND);
    } else
#endif
    {
        EXPECT(huge == SHM_OK);
        EXPECT(shm_section("huge2", (size_t)700 << 30, &a) == SHM_ERR_NO_MEMORY);
        EXPECT(shm_map("huge1", 0, &a) == SHM_OK && shm_delete_section(a) == SHM_OK);
    }
    /* SHM_ERR_TIMEOUT. */
    EXPECT(shm_sem("empty", 0, &s) == SHM_OK);
    EXPECT(shm_sem_wait(s, 0) == SHM_ERR_TIMEOUT);
    EXPECT(shm_sem_wait(s, 30) == SHM_ERR_TIMEOUT);
    EXPECT(shm_sem_post(s) == SHM_OK && shm_sem_wait(s, 0) == SHM_OK);
    EXPECT(shm_queue("lonely", 4096, &q) == SHM_OK);
    char buf[8];
    EXPECT(shm_q_read(q, buf, sizeof buf, 20) == SHM_ERR_TIMEOUT);
    /* SHM_ERR_CORRUPT: damage the first block header of a heap. */
    EXPECT(shm_heap("damaged", 1 << 20, &heap, 0) == SHM_OK);
    void *p = shm_alloc(heap, 100);
    EXPECT(p != NULL);
    memset((char *)heap + (16 << 10) + 8, 0xAA, 8);
    EXPECT(shm_heap_check(heap) == SHM_ERR_CORRUPT);
    printf("corrupt: %s\n", shm_last_error());
    /* force_init makes it sound again. */
    EXPECT(shm_heap("damaged", 1 << 20, &heap, 1) == SHM_EXISTS);
    EXPECT(shm_heap_check(heap) == SHM_OK);
    /* realloc keeps the contents. */
    char *c = shm_alloc(heap, 10);
    strcpy(c, "shm_nt");
    c = shm_realloc(c, 100000);
    EXPECT(c != NULL && strcmp(c, "shm_nt") == 0);
    EXPECT(shm_free(c) == SHM_OK);
    EXPECT(shm_free(c) == SHM_ERR_INVALID); /* double free */
    /* A size the thread cache serves: an interior pointer and a double free (of a block now
     * parked in the cache) are refused too, and the heap stays consistent. */
    char *blk = shm_alloc(heap, 100);
    EXPECT(blk != NULL);
    memset(blk, 0, 100);
    EXPECT(shm_free(blk + 16) == SHM_ERR_INVALID);
    EXPECT(shm_free(blk) == SHM_OK);
    EXPECT(shm_free(blk) == SHM_ERR_INVALID);
    EXPECT(shm_heap_check(heap) == SHM_OK);
    /* commit / decommit. */
    EXPECT(shm_section("sparse", 1UL << 30, &s) == SHM_OK);
    EXPECT(shm_commit(s, 1 << 20) == SHM_OK);
    ((char *)s)[100] = 5;
    int dec = shm_decommit(s, 0, 1 << 20);
#ifdef _WIN32
    /* Where the platform cannot free part of a section (Wine): a clear code, data kept. */
    if (dec == SHM_ERR_UNSUPPORTED) {
        printf("decommit: unsupported here (%s)\n", shm_last_error());
        EXPECT(((char *)s)[100] == 5);
    } else
#endif
    {
        EXPECT(dec == SHM_OK);
        EXPECT(((char *)s)[100] == 0);
    }
    shm_list_pools();
    shm_list_heap(stdout, "damaged");
    shm_list_heap(stdout, NULL); /* refused, nothing printed, no crash */
    EXPECT(shm_exit() == SHM_OK);
    /* SHM_ERR_PERMISSION: another user may not use this user's domain. */
#ifdef _WIN32
    printf("permission: skipped (Windows: no ACLs checked, every owner reads as uid 0)\n");
#else
    if (geteuid() == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            if (setuid(65534) != 0) _exit(3);
            uintptr_t x;
            _exit(shm_map("small", 0, &x) == SHM_ERR_PERMISSION ? 0 : 1);
        }
        int st;
        waitpid(pid, &st, 0);
        EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        printf("permission: checked as uid 65534\n");
    } else {
        printf("permission: skipped (needs root to switch users)\n");
    }
#endif
    printf("errors done\n");
}

/* SHM_ERR_OS: the domain's window is occupied in this process, so it cannot attach. */
static void os_error(const char *addr_text) {
    uintptr_t addr = (uintptr_t)strtoull(addr_text, NULL, 0);
#ifdef _WIN32
    /* The window is reserved in pieces at attach: take its first piece first. */
    void *p = VirtualAlloc((void *)addr, 1 << 20, MEM_RESERVE, PAGE_READONLY);
#else
    void *p = mmap((void *)addr, 1 << 20, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
#endif
    EXPECT(p == (void *)addr);
    uintptr_t a;
    EXPECT(shm_map("small", 0, &a) == SHM_ERR_OS);
    printf("os error: %s\n", shm_last_error());
}

/* Attaches, says so, then creates a heap, a queue and a section named after `tag`: the parent
 * kills it with SIGKILL somewhere in there. */
static void create_names(const char *tag) {
    uintptr_t h, q, s, a;
    EXPECT(shm_map("not-there", 0, &a) == SHM_ERR_NOT_FOUND); /* attaches */
    printf("ATTACHED\n");
    fflush(stdout);
    char name[64];
    snprintf(name, sizeof name, "%s.heap", tag);
    EXPECT(shm_heap(name, 4UL << 20, &h, 0) >= 0);
    snprintf(name, sizeof name, "%s.queue", tag);
    EXPECT(shm_queue(name, 8UL << 20, &q) >= 0);
    snprintf(name, sizeof name, "%s.sec", tag);
    EXPECT(shm_section(name, 1UL << 20, &s) >= 0);
    printf("CREATED\n");
}

/* Deletes what create_names made. */
static void delete_names(const char *tag) {
    const char *kinds[] = {"heap", "queue", "sec"};
    for (int i = 0; i < 3; i++) {
        char name[64];
        uintptr_t a;
        snprintf(name, sizeof name, "%s.%s", tag, kinds[i]);
        EXPECT(shm_map(name, 0, &a) == SHM_OK && shm_delete_section(a) == SHM_OK);
    }
}

/* Creates sections, a heap, semaphores and queues, uses and deletes them all, and returns
 * from main without shm_exit: the exit handler must leave nothing of the domain. */
static void tidy(void) {
    uintptr_t s1, s2, h, q1, q2, sem1, sem2, a;
    EXPECT(shm_section("tidy.a", 4096, &s1) == SHM_OK);
    EXPECT(shm_section("tidy.b", 1UL << 20, &s2) == SHM_OK);
    ((char *)s2)[12345] = 7;
    EXPECT(shm_heap("tidy.heap", 4UL << 20, &h, 0) == SHM_OK);
    void *p = shm_alloc(h, 100);
    EXPECT(p != NULL && shm_free(p) == SHM_OK);
    EXPECT(shm_sem("tidy.s1", 1, &sem1) == SHM_OK);
    EXPECT(shm_sem("tidy.s2", 0, &sem2) == SHM_OK);
    EXPECT(shm_sem_wait(sem1, 0) == SHM_OK);
    EXPECT(shm_sem_post(sem2) == SHM_OK);
    EXPECT(shm_queue("tidy.q1", 4096, &q1) == SHM_OK);
    EXPECT(shm_queue("tidy.q2", 64 << 10, &q2) == SHM_OK);
    char buf[8];
    EXPECT(shm_q_write(q1, "x", 2, 0) == SHM_OK);
    EXPECT(shm_q_read(q1, buf, sizeof buf, 0) == 2);
    EXPECT(shm_sem_delete(sem1) == SHM_OK);
    EXPECT(shm_sem_delete(sem1) == SHM_ERR_INVALID); /* gone */
    EXPECT(shm_sem_post(sem1) == SHM_ERR_INVALID);
    EXPECT(shm_map("shm_nt.objects", 0, &a) == SHM_OK); /* still holds tidy.s2 */
    EXPECT(shm_sem_delete(sem2) == SHM_OK);
    /* The objects heap went with its last semaphore (no other process uses it). */
    EXPECT(shm_map("shm_nt.objects", 0, &a) == SHM_ERR_NOT_FOUND);
    EXPECT(shm_delete_section(q1) == SHM_OK);
    EXPECT(shm_delete_section(q2) == SHM_OK);
    EXPECT(shm_delete_section(h) == SHM_OK);
    EXPECT(shm_delete_section(s1) == SHM_OK);
    EXPECT(shm_delete_section(s2) == SHM_OK);
    printf("tidy done\n");
}

/* Two processes share semaphores; the objects heap stays while either uses it. `sem_user
 * first` makes u.a and u.b, waits for the second on u.a, deletes u.a, posts u.b and exits;
 * `sem_user second` (started after READY) posts u.a, waits on u.b, and after a line on stdin
 * deletes u.b, the last semaphore: the heap goes with it. */
static void sem_user(const char *which) {
    uintptr_t sa, sb, a;
    char line[16];
    if (strcmp(which, "first") == 0) {
        EXPECT(shm_sem("u.a", 0, &sa) == SHM_OK);
        EXPECT(shm_sem("u.b", 0, &sb) == SHM_OK);
        printf("READY\n");
        fflush(stdout);
        EXPECT(shm_sem_wait(sa, 10000) == SHM_OK);
        EXPECT(shm_sem_delete(sa) == SHM_OK);
        EXPECT(shm_map("shm_nt.objects", 0, &a) == SHM_OK); /* the second uses it */
        EXPECT(shm_sem_post(sb) == SHM_OK);
    } else {
        EXPECT(shm_sem("u.a", 0, &sa) == SHM_EXISTS);
        EXPECT(shm_sem("u.b", 0, &sb) == SHM_EXISTS);
        EXPECT(shm_sem_post(sa) == SHM_OK);
        EXPECT(shm_sem_wait(sb, 10000) == SHM_OK);
        EXPECT(shm_sem_post(sa) == SHM_ERR_INVALID); /* deleted by the first */
        printf("WAITING\n");
        fflush(stdout);
        EXPECT(fgets(line, sizeof line, stdin) != NULL); /* the first has exited now */
        EXPECT(shm_map("shm_nt.objects", 0, &a) == SHM_OK);
        EXPECT(shm_sem_delete(sb) == SHM_OK);
        EXPECT(shm_map("shm_nt.objects", 0, &a) == SHM_ERR_NOT_FOUND);
    }
    printf("sem_user %s done\n", which);
}

/* A forked child returns from main (running the exit handler in a child): it must neither
 * crash nor release the parent's attachment. */
static void fork_exit(void) {
#ifdef _WIN32
    printf("fork_exit: skipped (Windows has no fork)\n");
    return;
#else
    uintptr_t s, a;
    EXPECT(shm_section("fork.sec", 4096, &s) == SHM_OK);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        ((char *)s)[0] = 42;
        exit(0); /* runs the atexit handler in the child */
    }
    int st;
    EXPECT(waitpid(pid, &st, 0) == pid);
    EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    EXPECT(((char *)s)[0] == 42);
    printf("CHILD_DONE\n");
    fflush(stdout);
    char line[16];
    EXPECT(fgets(line, sizeof line, stdin) != NULL); /* the test looks at the registry now */
    EXPECT(shm_map("fork.sec", 0, &a) == SHM_OK && a == s);
    EXPECT(shm_delete_section(s) == SHM_OK);
    printf("fork done\n");
#endif
}

/* A thread that keeps using shared memory while main returns: the exit handler runs under it. */
static uintptr_t busy_heap, busy_sec;

#ifdef _WIN32
static DWORD WINAPI busy(void *arg) {
#else
static void *busy(void *arg) {
#endif
    (void)arg;
    for (unsigned long i = 0;; i++) {
        ((volatile unsigned long *)busy_sec)[i % 512] = i;
        void *p = shm_alloc(busy_heap, 64);
        if (p != NULL) {
            memset(p, 1, 64);
            shm_free(p);
        }
    }
#ifdef _WIN32
    return 0;
#else
    return NULL;
#endif
}

static void exit_while_busy(void) {
    EXPECT(shm_heap("busy.heap", 4UL << 20, &busy_heap, 0) == SHM_OK);
    EXPECT(shm_section("busy.sec", 4096, &busy_sec) == SHM_OK);
#ifdef _WIN32
    EXPECT(CreateThread(NULL, 0, busy, NULL, 0, NULL) != NULL);
    Sleep(20);
#else
    pthread_t t;
    EXPECT(pthread_create(&t, NULL, busy, NULL) == 0);
    usleep(20000);
#endif
    printf("exiting while busy\n");
}

#ifdef _WIN32
/* The kill rounds where tests/c.rs uses kill(2) (run under Wine by ci/windows/c_tests.sh): this
 * process starts itself as the victim and ends it with TerminateProcess, as Windows ends a
 * process that crashed or was killed from outside. Nothing of the victim runs afterwards. */
static uint64_t krng = 0x9e3779b97f4a7c15ull;

static unsigned long next_rand(unsigned long bound) {
    krng ^= krng << 13;
    krng ^= krng >> 7;
    krng ^= krng << 17;
    return (unsigned long)(krng % bound);
}

static double now_ms(void) {
    LARGE_INTEGER f, t;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&t);
    return (double)t.QuadPart * 1000.0 / (double)f.QuadPart;
}

static void spin_us(unsigned long us) {
    double end = now_ms() + us / 1000.0;
    while (now_ms() < end) {
    }
}

/* Starts this program with ARGS, its stdout to a pipe whose read end goes to *out. */
static HANDLE spawn(const char *args, HANDLE *out) {
    char exe[MAX_PATH], cmd[MAX_PATH + 128];
    GetModuleFileNameA(NULL, exe, MAX_PATH);
    snprintf(cmd, sizeof cmd, "\"%s\" %s", exe, args);
    SECURITY_ATTRIBUTES sa = {sizeof sa, NULL, TRUE};
    HANDLE rd, wr;
    if (!CreatePipe(&rd, &wr, &sa, 0) || !SetHandleInformation(rd, HANDLE_FLAG_INHERIT, 0)) {
        fprintf(stderr, "CreatePipe: %lu\n", GetLastError());
        exit(1);
    }
    STARTUPINFOA si = {0};
    si.cb = sizeof si;
    si.dwFlags = STARTF_USESTDHANDLES;
    si.hStdInput = GetStdHandle(STD_INPUT_HANDLE);
    si.hStdOutput = wr;
    si.hStdError = GetStdHandle(STD_ERROR_HANDLE);
    PROCESS_INFORMATION pi;
    BOOL ok = CreateProcessA(NULL, cmd, NULL, NULL, TRUE, 0, NULL, NULL, &si, &pi);
    CloseHandle(wr);
    if (!ok) {
        fprintf(stderr, "CreateProcess %s: %lu\n", cmd, GetLastError());
        exit(1);
    }
    CloseHandle(pi.hThread);
    *out = rd;
    return pi.hProcess;
}

/* Reads the child's stdout until the line WANT; 0 if the pipe ends first. */
static int read_until(HANDLE rd, const char *want) {
    char line[256];
    size_t n = 0;
    char c;
    DWORD got;
    while (ReadFile(rd, &c, 1, &got, NULL) && got == 1) {
        if (c != '\n') {
            if (n < sizeof line - 1) line[n++] = c;
            continue;
        }
        if (n > 0 && line[n - 1] == '\r') n--;
        line[n] = 0;
        if (strcmp(line, want) == 0) return 1;
        n = 0;
    }
    return 0;
}

/* Waits (10 s at most) for a child; its exit code, or -1 if it did not end. */
static long reap(HANDLE h, HANDLE rd) {
    DWORD code = 0;
    long r = WaitForSingleObject(h, 10000) == WAIT_OBJECT_0 && GetExitCodeProcess(h, &code) ? (long)code : -1;
    if (r == -1) TerminateProcess(h, 99);
    CloseHandle(h);
    CloseHandle(rd);
    return r;
}

/* Ends the child, then waits for it: 1 if it was terminated, 0 if it had finished cleanly. */
static int terminate(HANDLE h, HANDLE rd, int round) {
    TerminateProcess(h, 137);
    long code = reap(h, rd);
    if (code != 137 && code != 0) {
        fprintf(stderr, "round %d: the victim ended with %ld\n", round, code);
        failures++;
    }
    return code == 137;
}

/* Names whose creator was terminated mid-create are usable at once (tests/c.rs's kill rounds):
 * this process stays attached; each round a child creates a heap, a queue and a section and is
 * terminated 0-3 ms after it attached; then this process uses (or makes) all three within 1 s
 * and deletes them. */
static void kill_rounds(const char *rounds_text) {
    int rounds = atoi(rounds_text), killed = 0;
    uintptr_t a;
    double slowest = 0;
    EXPECT(shm_map("not-there", 0, &a) == SHM_ERR_NOT_FOUND); /* attaches */
    krng ^= GetCurrentProcessId();
    for (int round = 0; round < rounds; round++) {
        char args[64];
        snprintf(args, sizeof args, "create_names r%d", round);
        HANDLE rd, h = spawn(args, &rd);
        EXPECT(read_until(rd, "ATTACHED"));
        spin_us(next_rand(3000));
        killed += terminate(h, rd, round);
        double t = now_ms();
        uintptr_t heap, q, sec;
        char name[64];
        snprintf(name, sizeof name, "r%d.heap", round);
        EXPECT(shm_heap(name, 4UL << 20, &heap, 0) >= 0);
        void *p = shm_alloc(heap, 64);
        EXPECT(p != NULL && shm_heap_check(heap) == SHM_OK);
        snprintf(name, sizeof name, "r%d.queue", round);
        EXPECT(shm_queue(name, 8UL << 20, &q) >= 0);
        EXPECT(shm_q_write(q, "ok", 3, 0) == SHM_OK);
        snprintf(name, sizeof name, "r%d.sec", round);
        EXPECT(shm_section(name, 1UL << 20, &sec) >= 0);
        ((volatile char *)sec)[0] = 1;
        double took = now_ms() - t;
        if (took > slowest) slowest = took;
        EXPECT(took < 1000);
        EXPECT(shm_delete_section(heap) == SHM_OK);
        EXPECT(shm_delete_section(q) == SHM_OK);
        EXPECT(shm_delete_section(sec) == SHM_OK);
    }
    printf("kill rounds: %d rounds, %d creators terminated, slowest open %.1f ms\n", rounds, killed, slowest);
    EXPECT(killed >= rounds / 5);
    EXPECT(shm_exit() == SHM_OK);
}

/* Entries of the shm directory (SHMGADGET_SHM_DIR) other than . and .. */
static int shm_dir_entries(void) {
    char pattern[MAX_PATH];
    snprintf(pattern, sizeof pattern, "%s\\*", getenv("SHMGADGET_SHM_DIR"));
    WIN32_FIND_DATAA fd;
    HANDLE f = FindFirstFileA(pattern, &fd);
    if (f == INVALID_HANDLE_VALUE) return -1;
    int n = 0;
    do {
        if (strcmp(fd.cFileName, ".") != 0 && strcmp(fd.cFileName, "..") != 0) n++;
    } while (FindNextFileA(f, &fd));
    FindClose(f);
    return n;
}

/* A domain whose first process was terminated 0-4 ms after it started (anywhere in attaching
 * or creating) is usable at once by the next, and the last to leave takes all of it. This
 * process never uses the library: every step is a child. */
static void first_kill(const char *rounds_text) {
    int rounds = atoi(rounds_text), killed = 0;
    double slowest = 0, slowest_all = 0;
    krng ^= GetCurrentProcessId();
    for (int round = 0; round < rounds; round++) {
        HANDLE rd, h = spawn("create_names n", &rd);
        spin_us(next_rand(4000));
        killed += terminate(h, rd, round);
        /* The next process's creations (after it attached) wait for nobody: 1 s at most, as
         * on Linux. Its start and attach are bounded by 5 s: a Wine process takes 0.3-0.6 s
         * to start on this machine, an attach that waited for the dead would take longer. */
        double t = now_ms();
        h = spawn("create_names n", &rd);
        EXPECT(read_until(rd, "ATTACHED"));
        double attached = now_ms();
        EXPECT(read_until(rd, "CREATED"));
        EXPECT(reap(h, rd) == 0);
        double took = now_ms() - attached, all = now_ms() - t;
        if (took > slowest) slowest = took;
        if (all > slowest_all) slowest_all = all;
        EXPECT(took < 1000);
        EXPECT(all < 5000);
        h = spawn("delete_names n", &rd);
        EXPECT(reap(h, rd) == 0);
        int left = shm_dir_entries();
        if (left != 0) {
            fprintf(stderr, "round %d: %d objects left in the shm directory\n", round, left);
            failures++;
        }
    }
    printf("first kill: %d rounds, %d first processes terminated; the next process: slowest creations %.1f ms, "
           "slowest start to end %.0f ms\n",
           rounds, killed, slowest, slowest_all);
}

/* The victim of kill_traffic: four threads allocate, write and free in the shared heap until
 * the process is terminated. */
static uintptr_t traffic_heap;

static DWORD WINAPI traffic_thread(void *arg) {
    uint64_t s = (uintptr_t)arg * 0x9e3779b97f4a7c15ull | 1;
    unsigned char *live[8] = {0};
    for (;;) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        unsigned slot = (unsigned)(s % 8);
        if (live[slot] != NULL) shm_free(live[slot]);
        size_t size = 1 + (size_t)(s >> 8) % 4000;
        live[slot] = shm_alloc(traffic_heap, size);
        if (live[slot] != NULL) memset(live[slot], (int)slot, size);
    }
    return 0;
}

static void traffic(void) {
    EXPECT(shm_heap("traffic.heap", 64UL << 20, &traffic_heap, 0) == SHM_EXISTS);
    for (uintptr_t i = 1; i < 4; i++) EXPECT(CreateThread(NULL, 0, traffic_thread, (void *)i, 0, NULL) != NULL);
    printf("TRAFFIC\n");
    fflush(stdout);
    traffic_thread((void *)(uintptr_t)4);
}

/* A heap (64 MiB) shared with a process terminated mid-traffic (its lock possibly held): this
 * process checks it (OwnerDied is repaired) and allocates 4 MiB, each round. The blocks and
 * thread caches of the terminated process stay allocated (in a 16 MiB heap the largest
 * possible allocation shrank by 0.8-1 MiB a round). */
static void kill_traffic(const char *rounds_text) {
    int rounds = atoi(rounds_text), killed = 0;
    double slowest = 0;
    uintptr_t heap;
    EXPECT(shm_heap("traffic.heap", 64UL << 20, &heap, 0) == SHM_OK);
    krng ^= GetCurrentProcessId();
    for (int round = 0; round < rounds; round++) {
        HANDLE rd, h = spawn("traffic", &rd);
        EXPECT(read_until(rd, "TRAFFIC"));
        spin_us(1000 + next_rand(20000));
        killed += terminate(h, rd, round);
        double t = now_ms();
        int rc = shm_heap_check(heap);
        if (rc != SHM_OK) {
            fprintf(stderr, "round %d: shm_heap_check: %d %s\n", round, rc, shm_last_error());
            failures++;
        }
        void *big = shm_alloc(heap, 4UL << 20);
        EXPECT(big != NULL && shm_free(big) == SHM_OK);
        double took = now_ms() - t;
        if (took > slowest) slowest = took;
    }
    EXPECT(shm_heap_check(heap) == SHM_OK);
    printf("kill traffic: %d rounds, %d terminated mid-traffic, heap consistent, 4 MiB allocated after each, slowest "
           "check %.1f ms\n",
           rounds, killed, slowest);
    EXPECT(killed == rounds);
    EXPECT(shm_delete_section(heap) == SHM_OK);
    EXPECT(shm_exit() == SHM_OK);
}
#endif

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (strcmp(argv[1], "build") == 0) build();
    else if (strcmp(argv[1], "walk") == 0) walk();
    else if (strcmp(argv[1], "reader") == 0) reader();
    else if (strcmp(argv[1], "writer") == 0) writer();
    else if (strcmp(argv[1], "errors") == 0) errors();
    else if (strcmp(argv[1], "os_error") == 0 && argc > 2) os_error(argv[2]);
    else if (strcmp(argv[1], "create_names") == 0 && argc > 2) create_names(argv[2]);
    else if (strcmp(argv[1], "delete_names") == 0 && argc > 2) delete_names(argv[2]);
    else if (strcmp(argv[1], "tidy") == 0) tidy();
    else if (strcmp(argv[1], "sem_user") == 0 && argc > 2) sem_user(argv[2]);
    else if (strcmp(argv[1], "fork_exit") == 0) fork_exit();
    else if (strcmp(argv[1], "exit_while_busy") == 0) exit_while_busy();
#ifdef _WIN32
    else if (strcmp(argv[1], "kill_rounds") == 0 && argc > 2) kill_rounds(argv[2]);
    else if (strcmp(argv[1], "first_kill") == 0 && argc > 2) first_kill(argv[2]);
    else if (strcmp(argv[1], "kill_traffic") == 0 && argc > 2) kill_traffic(argv[2]);
    else if (strcmp(argv[1], "traffic") == 0) traffic();
#endif
    else return 2;
    fflush(stdout);
    return failures == 0 ? 0 : 1;
}
