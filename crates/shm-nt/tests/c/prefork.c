/* A prefork server in C, the way PostgreSQL's postmaster works: the parent attaches, creates a
 * heap, a semaphore and four byte queues, then forks four workers and calls shm_exit while they
 * run. Workers pair up (0-1, 2-3) and pass MESSAGES messages each way; each message is the
 * address of a heap block allocated by the sender, holding its sequence number, its sender and
 * a pattern, checked and freed by the receiver. Worker 3 is killed with SIGKILL after its
 * exchange: worker 2 must be told SHM_ERR_DISCONNECTED, while pair 0-1 keeps exchanging until
 * it is, and then a thousand more. The parent prints "CODES c0 c1 c2 c3" (exit codes, -signal
 * for a killed worker) and exits 0 if it could run the show. */

#define _GNU_SOURCE
#include <shm_nt.h>

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MESSAGES 100000UL

struct msg {
    uint64_t addr, seq, size;
};

static uintptr_t heap, sem, queue[4];
static _Atomic unsigned *kill_seen;
static int pipe_fds[2];

static void fail(const char *what, long rc) {
    fprintf(stderr, "prefork worker %d: %s failed (%ld): %s\n", (int)getpid(), what, rc, shm_last_error());
    _exit(1);
}

static uint64_t next_rand(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void send_one(int me, uint64_t seq, uint64_t *rng) {
    uint64_t size = 24 + next_rand(rng) % 2000;
    unsigned char *p = shm_alloc(heap, size);
    if (!p) fail("shm_alloc", 0);
    memcpy(p, &seq, 8);
    uint64_t owner = (uint64_t)me;
    memcpy(p + 8, &owner, 8);
    memset(p + 16, (int)((seq ^ owner) & 0xff), size - 16);
    struct msg m = {(uint64_t)(uintptr_t)p, seq, size};
    int rc = shm_q_write(queue[me], &m, sizeof m, 60000);
    if (rc != SHM_OK) fail("shm_q_write", rc);
}

/* Receives one message from `from`: 1 if it was a block (checked and freed), 0 for the end
 * mark, or the negative status. */
static long recv_one(int from, uint64_t expect) {
    struct msg m;
    long n = shm_q_read(queue[from], &m, sizeof m, 60000);
    if (n < 0) return n;
    if (n != (long)sizeof m) fail("message length", n);
    if (m.addr == 0) return 0;
    unsigned char *p = (unsigned char *)(uintptr_t)m.addr;
    uint64_t seq, owner;
    memcpy(&seq, p, 8);
    memcpy(&owner, p + 8, 8);
    if (m.seq != expect || seq != expect || owner != (uint64_t)from) fail("block header", (long)m.seq);
    for (uint64_t i = 16; i < m.size; i++)
        if (p[i] != (unsigned char)((seq ^ owner) & 0xff)) fail("block pattern", (long)i);
    int rc = shm_free(p);
    if (rc != SHM_OK) fail("shm_free", rc);
    return 1;
}

static int worker(int me) {
    int peer = me ^ 1;
    uint64_t rng = 0x9e3779b97f4a7c15ULL ^ (uint64_t)me;
    int rc = shm_sem_wait(sem, 30000);
    if (rc != SHM_OK) fail("shm_sem_wait", rc);
    /* Lock step: send one, receive one (each direction has its own queue, so nobody waits for
     * the other to read first). Pair 0-1 goes on until it hears of the kill, then 1000 more. */
    /* The two sides of pair 0-1 see the kill at different moments, so one may stop first: the
     * other then meets its end mark inside this loop and must not wait for it again below. */
    uint64_t sent = 0, got = 0, extra = 0;
    int peer_done = 0;
    for (;;) {
        int more = sent < MESSAGES;
        if (!more && me < 2) {
            if (atomic_load(kill_seen) == 1) more = extra++ < 1000;
            else more = 1;
        }
        if (!more) break;
        send_one(me, sent++, &rng);
        if (peer_done) continue;
        long r = recv_one(peer, got);
        if (r < 0) fail("shm_q_read", r);
        if (r == 1) got++;
        else peer_done = 1;
    }
    struct msg end = {0, 0, 0};
    rc = shm_q_write(queue[me], &end, sizeof end, 60000);
    if (rc != SHM_OK) fail("shm_q_write (end)", rc);
    long r = 0;
    if (!peer_done)
        while ((r = recv_one(peer, got)) == 1) got++;
    if (r < 0) fail("shm_q_read (drain)", r);
    if (me == 3) {
        if (write(pipe_fds[1], "3", 1) != 1) fail("write", 0);
        for (;;) pause();
    }
    if (me == 2) {
        r = recv_one(peer, got);
        if (r != SHM_ERR_DISCONNECTED) fail("expected SHM_ERR_DISCONNECTED after the peer's death", r);
        fprintf(stderr, "prefork worker 2: %lu messages, then disconnected\n", (unsigned long)got);
        atomic_store(kill_seen, 1);
    } else {
        fprintf(stderr, "prefork worker %d: %lu messages from worker %d\n", me, (unsigned long)got, peer);
        if (got < MESSAGES) fail("too few messages", (long)got);
    }
    return 0;
}

int main(void) {
    uintptr_t flags;
    int rc = shm_heap("heap", 256UL << 20, &heap, 0);
    if (rc < 0) fail("shm_heap", rc);
    rc = shm_sem("start", 0, &sem);
    if (rc < 0) fail("shm_sem", rc);
    rc = shm_section("flags", 4096, &flags);
    if (rc < 0) fail("shm_section", rc);
    kill_seen = (_Atomic unsigned *)flags;
    atomic_store(kill_seen, 0);
    for (int i = 0; i < 4; i++) {
        char name[8];
        snprintf(name, sizeof name, "q%d", i);
        rc = shm_queue(name, 64 << 10, &queue[i]);
        if (rc < 0) fail("shm_queue", rc);
    }
    if (pipe(pipe_fds) != 0) fail("pipe", 0);
    fflush(NULL);
    pid_t pids[4];
    for (int i = 0; i < 4; i++) {
        pids[i] = fork();
        if (pids[i] < 0) fail("fork", 0);
        if (pids[i] == 0) _exit(worker(i));
    }
    close(pipe_fds[1]);
    for (int i = 0; i < 4; i++) {
        rc = shm_sem_post(sem);
        if (rc != SHM_OK) fail("shm_sem_post", rc);
    }
    /* The parent leaves while its workers run: that must disturb nothing. */
    rc = shm_exit();
    if (rc != SHM_OK) fail("shm_exit", rc);
    char byte;
    if (read(pipe_fds[0], &byte, 1) != 1) fail("read (worker 3 never finished)", 0);
    kill(pids[3], SIGKILL);
    printf("CODES");
    for (int i = 0; i < 4; i++) {
        int status;
        if (waitpid(pids[i], &status, 0) != pids[i]) fail("waitpid", i);
        printf(" %d", WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status));
    }
    printf("\n");
    return 0;
}
