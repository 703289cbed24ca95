//! Who is alive is decided by the kernel: forked children are participants of their own,
//! a parent that dies is seen dead while its children live, and heap thread caches stay
//! correct across PID namespaces.
//!
//! `fork()` happens only inside role processes (never in the multi-threaded test harness); a
//! forked child ends with `_exit`, so it never runs the harness's code.
#![cfg(unix)]

mod common;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use shmgadget::heap::Heap;
use shmgadget::queue::ByteQueue;
use shmgadget::sync::Semaphore;
use shmgadget::{Domain, DomainOptions, ErrorKind};

const GIB: u64 = 1 << 30;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn child_attach() -> Domain {
    Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap()
}

/// Forks; the child runs `f` and `_exit`s with its result (101 if it panicked).
fn fork_child(f: impl FnOnce() -> i32) -> libc::pid_t {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: fork(2) in a role process whose other threads (the watchdog, the idle harness
    // main thread) hold no lock the child needs; the child only runs `f` and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        let _ = std::io::stdout().flush();
        // SAFETY: ends the child without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for a forked child (watchdog: `limit`); returns its exit code, or `-signal`.
fn wait_pid(pid: libc::pid_t, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid({pid}): {}", std::io::Error::last_os_error());
        if r == pid {
            return if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -libc::WTERMSIG(status) };
        }
        if start.elapsed() > limit {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("forked child {pid} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kill9_pid(pid: libc::pid_t) {
    // SAFETY: kill(2) on our own child, not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

// ---------------------------------------------------------------------------------------------
// Prefork
// ---------------------------------------------------------------------------------------------

const PREFORK_MESSAGES: u64 = 100_000;

/// One direction of a pair: allocates a block per message, fills it, sends its address; stops
/// after `PREFORK_MESSAGES` and, if `until` is given, once it is set plus 1,000 more. Ends
/// with address 0.
fn prefork_send(heap: &Heap, q: &ByteQueue, me: u64, until: Option<&AtomicU32>) {
    let mut tx = q.sender().unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ me;
    let mut extra = 0;
    for seq in 0u64.. {
        if seq >= PREFORK_MESSAGES {
            match until {
                None => break,
                // Acquire: pairs with the Release store of the worker that saw the kill.
                Some(flag) if flag.load(Ordering::Acquire) == 1 => {
                    extra += 1;
                    if extra > 1000 {
                        break;
                    }
                }
                Some(_) => {}
            }
        }
        let size = 16 + (rng(&mut seed) % 2000) as usize;
        let p = heap.alloc(Layout::from_size_align(size, 16).unwrap()).unwrap();
        // SAFETY: a fresh block of `size` >= 16 bytes, ours until we send it.
        unsafe {
            p.as_ptr().cast::<u64>().write(seq);
            p.as_ptr().add(8).cast::<u64>().write(me);
            p.as_ptr().add(16).write_bytes((seq as u8) ^ (me as u8), size - 16);
        }
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&(p.as_ptr() as u64).to_le_bytes());
        msg[8..16].copy_from_slice(&seq.to_le_bytes());
        msg[16..].copy_from_slice(&(size as u64).to_le_bytes());
        tx.send(&msg).unwrap();
    }
    tx.send(&[0u8; 24]).unwrap();
}

/// The other direction: checks each block (owner, sequence, pattern) and frees it, until the
/// end mark. Returns the messages received and, with `expect_death`, the error the next
/// receive returned (the sender must die instead of sending more).
fn prefork_recv(heap: &Heap, q: &ByteQueue, from: u64, expect_death: bool) -> (u64, Option<shmgadget::Error>) {
    let mut rx = q.receiver().unwrap();
    let mut next = 0u64;
    loop {
        let m = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let addr = u64::from_le_bytes(m[..8].try_into().unwrap());
        let seq = u64::from_le_bytes(m[8..16].try_into().unwrap());
        let size = u64::from_le_bytes(m[16..].try_into().unwrap()) as usize;
        drop(m);
        if addr == 0 {
            if !expect_death {
                return (next, None);
            }
            return match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(_) => panic!("a message after the end mark from worker {from}"),
                Err(e) => (next, Some(e)),
            };
        }
        assert_eq!(seq, next, "messages from worker {from} arrive in order");
        let p = NonNull::new(addr as *mut u8).unwrap();
        // SAFETY: the sender gave the block up when it sent its address; it is ours now.
        let data = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
        assert_eq!(u64::from_ne_bytes(data[..8].try_into().unwrap()), seq, "block {addr:#x} holds its sequence");
        assert_eq!(u64::from_ne_bytes(data[8..16].try_into().unwrap()), from, "block {addr:#x} holds its owner");
        assert!(data[16..].iter().all(|&b| b == (seq as u8) ^ (from as u8)), "block {addr:#x} is intact");
        // SAFETY: nobody uses the block after this.
        unsafe { heap.free(p).unwrap() };
        next += 1;
    }
}

#[test]
fn prefork_workers_pass_messages_and_blocks_and_a_killed_worker_is_seen_dead_by_its_peer_only() {
    const TEST: &str = "prefork_workers_pass_messages_and_blocks_and_a_killed_worker_is_seen_dead_by_its_peer_only";
    match role().as_deref() {
        Some("server") => {
            let d = child_attach();
            let heap = Heap::create(&d, "heap", 256 << 20).unwrap();
            let (sem, _) = heap.find_or_zeroed::<Semaphore>("start").unwrap();
            sem.init(0).unwrap();
            let (kill_seen, _) = heap.find_or_zeroed::<AtomicU32>("kill_seen").unwrap();
            // Queue `i` carries worker i's messages to its partner (i ^ 1).
            let queues: Vec<ByteQueue> =
                (0..4).map(|i| ByteQueue::create(&d, &format!("q{i}"), 64 << 10).unwrap()).collect();
            let mut pipe = [0i32; 2];
            // SAFETY: pipe(2) with a valid two-int array.
            assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
            let workers: Vec<libc::pid_t> = (0..4u64)
                .map(|me| {
                    let (heap, queues, sem, kill_seen) = (&heap, &queues, sem, kill_seen);
                    fork_child(move || {
                        sem.wait_timeout(Duration::from_secs(30)).unwrap();
                        let peer = me ^ 1;
                        let (out, inp) = (&queues[me as usize], &queues[peer as usize]);
                        let killed_pair = me >= 2;
                        std::thread::scope(|s| {
                            let until = (!killed_pair).then_some(kill_seen);
                            s.spawn(move || prefork_send(heap, out, me, until));
                            match me {
                                // Its partner (3) is killed after the exchange: told Disconnected.
                                2 => {
                                    let (n, err) = prefork_recv(heap, inp, peer, true);
                                    assert_eq!(n, PREFORK_MESSAGES);
                                    let err = err.unwrap();
                                    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
                                    eprintln!("worker 2: {n} messages, then: {err}");
                                    // Release: pairs with the Acquire load in the other pair.
                                    kill_seen.store(1, Ordering::Release);
                                }
                                3 => {
                                    let (n, _) = prefork_recv(heap, inp, peer, false);
                                    assert_eq!(n, PREFORK_MESSAGES);
                                }
                                _ => {
                                    let (n, _) = prefork_recv(heap, inp, peer, false);
                                    assert!(n >= PREFORK_MESSAGES + 1000, "{n}");
                                    eprintln!("worker {me}: {n} messages from worker {peer}");
                                }
                            }
                        });
                        if me == 3 {
                            // The scope's threads may still run their thread-local destructors
                            // (giving their cache stock back under the heap lock): let them end.
                            std::thread::sleep(Duration::from_millis(200));
                            // Done: tell the server, which kills us while we hold our handles.
                            // SAFETY: write(2) of one byte from a valid buffer to our pipe.
                            assert_eq!(unsafe { libc::write(pipe[1], b"3".as_ptr().cast(), 1) }, 1);
                            loop {
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                        heap.flush_thread_cache().unwrap();
                        0
                    })
                })
                .collect();
            // SAFETY: our copy of the write end; the workers keep theirs (so a worker that
            // dies early makes the read below return 0 instead of hanging).
            unsafe { libc::close(pipe[1]) };
            for _ in 0..4 {
                sem.post().unwrap();
            }
            // The server leaves while its workers run: that must disturb nothing.
            drop(queues);
            drop(heap);
            d.detach().unwrap();
            println!("SERVER_DETACHED=1");
            let mut byte = 0u8;
            // SAFETY: read(2) of one byte into a valid buffer from our pipe.
            assert_eq!(unsafe { libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1) }, 1);
            kill9_pid(workers[3]);
            let codes: Vec<i32> = workers.iter().map(|&w| wait_pid(w, Duration::from_secs(240))).collect();
            println!("CODES={codes:?}");
        }
        _ => {
            let domain = unique_domain("prefork");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let mut server = spawn(TEST, "server", &domain, &[]);
            let out = server.stdout.take().unwrap();
            let reader = std::thread::spawn(move || {
                use std::io::BufRead;
                std::io::BufReader::new(out)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                    .collect::<std::collections::HashMap<_, _>>()
            });
            let status = wait(&mut server, Duration::from_secs(300));
            let r = reader.join().unwrap();
            assert!(status.success(), "the server failed: {status}; {r:?}");
            assert_eq!(r["CODES"], format!("{:?}", [0, 0, 0, -libc::SIGKILL]), "workers' exit codes");
            // Every worker is gone, and nothing they did broke the heap.
            let heap = Heap::open(&d, "heap").unwrap();
            heap.check().unwrap();
            let s = heap.stats().unwrap();
            // The two named objects; plus at most one block per recovery, if the killed worker
            // still held the heap lock (a block being freed by a killed process may leak).
            assert!(
                s.blocks.used_blocks >= 2 && s.blocks.used_blocks - 2 <= s.recoveries,
                "only the two named objects remain in use: {s:?}"
            );
            let alive: Vec<_> = d.processes().into_iter().filter(|p| p.alive).collect();
            assert_eq!(alive.len(), 1, "only the test process is alive: {alive:?}");
            drop(heap);
            for name in ["q0", "q1", "q2", "q3", "heap"] {
                d.delete_section(name).unwrap();
            }
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A parent that dies while its child lives
// ---------------------------------------------------------------------------------------------

#[test]
fn a_parent_killed_while_its_forked_child_lives_is_seen_dead_and_the_child_alive() {
    const TEST: &str = "a_parent_killed_while_its_forked_child_lives_is_seen_dead_and_the_child_alive";
    let my_entry = |d: &Domain, pid: u32| d.processes().into_iter().filter(|p| p.pid == pid).collect::<Vec<_>>();
    match role().as_deref() {
        Some("parent") => {
            let mut handles = Some((child_attach(), None::<Heap>));
            if let Some((d, h)) = handles.as_mut() {
                *h = Some(Heap::open(d, "heap").unwrap());
            }
            let me = std::process::id();
            // A child that detaches and exits at once leaves the parent's registration alone.
            let quick = fork_child(|| {
                let (d, heap) = handles.take().unwrap();
                let heap = heap.unwrap();
                let p = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
                // SAFETY: freed right away, never used.
                unsafe { heap.free(p).unwrap() };
                heap.flush_thread_cache().unwrap();
                drop(heap);
                // The last handle in the child: a real detach.
                d.detach().unwrap();
                0
            });
            assert_eq!(wait_pid(quick, Duration::from_secs(30)), 0);
            let (d, heap) = handles.as_ref().unwrap();
            let heap = heap.as_ref().unwrap();
            let (child_pid, _) = heap.find_or_zeroed::<AtomicU32>("child_pid").unwrap();
            let (verdict, _) = heap.find_or_zeroed::<AtomicU32>("verdict").unwrap();
            let mine = my_entry(d, me);
            assert!(mine.len() == 1 && mine[0].alive, "the parent is still registered and alive: {mine:?}");
            let p = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
            // SAFETY: freed right away, never used.
            unsafe { heap.free(p).unwrap() };
            // The long-lived child.
            fork_child(|| {
                let own = std::process::id();
                let ok = (|| {
                    // Its own registration, with its own pid, alive.
                    let e = my_entry(d, own);
                    if e.len() != 1 || !e[0].alive {
                        eprintln!("child: own entry {e:?}");
                        return false;
                    }
                    // Release: pairs with the parent's Acquire loads; the entry exists.
                    child_pid.store(own, Ordering::Release);
                    // Wait for the test to kill our parent and say so.
                    let t = Instant::now();
                    // Acquire: pairs with the test's Release store.
                    while verdict.load(Ordering::Acquire) != 1 {
                        if t.elapsed() > Duration::from_secs(60) {
                            return false;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    let parent = my_entry(d, me);
                    let own_now = my_entry(d, own);
                    eprintln!("child: parent {parent:?}, self {own_now:?}");
                    parent.iter().all(|p| !p.alive) && own_now.len() == 1 && own_now[0].alive
                })();
                // Our heap still works, and our detach leaves the test process's entry alone.
                let p = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
                // SAFETY: freed right away, never used.
                unsafe { heap.free(p).unwrap() };
                heap.flush_thread_cache().unwrap();
                // Release: pairs with the test's Acquire load.
                verdict.store(if ok { 2 } else { 3 }, Ordering::Release);
                0
            });
            let t = Instant::now();
            // Acquire: pairs with the child's Release store.
            while child_pid.load(Ordering::Acquire) == 0 {
                assert!(t.elapsed() < Duration::from_secs(30), "the child never registered");
                std::thread::sleep(Duration::from_millis(2));
            }
            println!("READY");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        _ => {
            let domain = unique_domain("orphan");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "heap", 16 << 20).unwrap();
            let (child_pid, _) = heap.find_or_zeroed::<AtomicU32>("child_pid").unwrap();
            let (verdict, _) = heap.find_or_zeroed::<AtomicU32>("verdict").unwrap();
            let mut parent = spawn(TEST, "parent", &domain, &[]);
            wait_for_line(&mut parent, "READY");
            let (ppid, cpid) = (parent.id(), child_pid.load(Ordering::Acquire));
            let before = (my_entry(&d, ppid), my_entry(&d, cpid));
            assert!(before.0.len() == 1 && before.0[0].alive, "the parent is alive first: {before:?}");
            assert!(before.1.len() == 1 && before.1[0].alive, "the child has its own live entry: {before:?}");
            kill9(&mut parent);
            let after = (my_entry(&d, ppid), my_entry(&d, cpid));
            assert!(after.0.iter().all(|p| !p.alive), "the killed parent is seen dead: {after:?}");
            assert!(after.1.len() == 1 && after.1[0].alive, "its child is still alive: {after:?}");
            // Release: pairs with the child's Acquire load.
            verdict.store(1, Ordering::Release);
            let t = Instant::now();
            // Acquire: pairs with the child's Release store.
            while verdict.load(Ordering::Acquire) == 1 {
                assert!(t.elapsed() < Duration::from_secs(60), "the child never answered");
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(verdict.load(Ordering::Acquire), 2, "the child saw its parent dead and itself alive");
            // The orphan ends with `_exit` (no detach): its token goes with it.
            let t = Instant::now();
            while my_entry(&d, cpid).iter().any(|p| p.alive) {
                assert!(t.elapsed() < Duration::from_secs(30), "the child never exited");
                std::thread::sleep(Duration::from_millis(5));
            }
            heap.check().unwrap();
            drop(heap);
            d.delete_section("heap").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PID namespaces
// ---------------------------------------------------------------------------------------------

/// Seconds the namespace test runs: `SHMG_PIDNS_SECS`, default 5 (the full run is 20).
fn pidns_secs() -> u64 {
    std::env::var("SHMG_PIDNS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5)
}

/// 8 lanes of threads; each lane runs a new thread every ~500 ms (so cache slots are claimed,
/// and dead ones reclaimed, while other threads keep using theirs). Each block holds its owner id and a pattern, checked
/// before it is freed. Returns operations done.
fn pidns_traffic(heap: &Heap, worker: u64, secs: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(secs);
    let ops = AtomicU64::new(0);
    std::thread::scope(|s| {
        for lane in 0..8u64 {
            let ops = &ops;
            s.spawn(move || {
                let mut round = 0u64;
                while Instant::now() < until {
                    let owner = worker << 48 | lane << 32 | round;
                    round += 1;
                    let stop = (Instant::now() + Duration::from_millis(500)).min(until);
                    let n = std::thread::scope(|s| {
                        s.spawn(move || {
                            let mut seed = owner.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                            let mut live: Vec<(NonNull<u8>, usize, u64)> = Vec::new();
                            let mut n = 0u64;
                            let check_free = |(p, size, tag): (NonNull<u8>, usize, u64)| {
                                // SAFETY: a live block of ours, `size` bytes.
                                let data = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
                                let got = u64::from_ne_bytes(data[..8].try_into().unwrap());
                                assert_eq!(got, owner, "block {p:p} was handed to owner {got:#x} too");
                                assert!(data[8..].iter().all(|&b| b == tag as u8), "block {p:p} overwritten");
                                // SAFETY: nobody uses it after this.
                                unsafe { heap.free(p).unwrap() };
                            };
                            while Instant::now() < stop {
                                if live.len() < 32 && (live.len() < 4 || rng(&mut seed) % 2 == 0) {
                                    let size = if rng(&mut seed) % 16 == 0 {
                                        4096 + 4096
                                    } else {
                                        16 + (rng(&mut seed) % 512) as usize
                                    };
                                    let p = heap.alloc(Layout::from_size_align(size, 16).unwrap()).unwrap();
                                    let tag = rng(&mut seed) % 255 + 1;
                                    // SAFETY: a fresh block of `size` >= 16 bytes, ours alone.
                                    unsafe {
                                        p.as_ptr().cast::<u64>().write_unaligned(owner);
                                        p.as_ptr().add(8).write_bytes(tag as u8, size - 8);
                                    }
                                    live.push((p, size, tag));
                                } else {
                                    let i = (rng(&mut seed) % live.len() as u64) as usize;
                                    check_free(live.swap_remove(i));
                                }
                                n += 1;
                            }
                            live.into_iter().for_each(check_free);
                            // Half the threads give their stock back, half leave it to be
                            // reclaimed by someone else once they are gone.
                            if owner % 2 == 0 {
                                heap.flush_thread_cache().unwrap();
                            }
                            n
                        })
                        .join()
                        .unwrap()
                    });
                    ops.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
    });
    ops.into_inner()
}

#[test]
fn a_heap_shared_across_pid_namespaces_never_hands_a_block_out_twice() {
    const TEST: &str = "a_heap_shared_across_pid_namespaces_never_hands_a_block_out_twice";
    match role().as_deref() {
        Some("worker") => {
            let d = child_attach();
            let heap = Heap::open(&d, "heap").unwrap();
            let worker: u64 = std::env::var("SHMG_WORKER").unwrap().parse().unwrap();
            // SAFETY: getpid(2) has no preconditions.
            eprintln!("worker {worker}: pid {} in its namespace", unsafe { libc::getpid() });
            let ops = pidns_traffic(&heap, worker, std::env::var("SHMG_SECS").unwrap().parse().unwrap());
            println!("OPS={ops}");
        }
        _ => {
            let ok = std::process::Command::new("unshare")
                .args(["--pid", "--fork", "true"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "SKIPPED {TEST}: `unshare --pid --fork` is unavailable here (needs util-linux and CAP_SYS_ADMIN)"
                );
                return;
            }
            let domain = unique_domain("pidns");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "heap", 512 << 20).unwrap();
            let secs = pidns_secs();
            let exe = std::env::current_exe().unwrap();
            let start = |worker: u64, in_ns: bool| {
                let mut cmd = if in_ns {
                    let mut c = std::process::Command::new("unshare");
                    c.args(["--pid", "--fork", "--kill-child"]).arg(&exe);
                    c
                } else {
                    std::process::Command::new(&exe)
                };
                cmd.args([TEST, "--exact", "--nocapture", "--test-threads=1", "-q"])
                    .env(ROLE, "worker")
                    .env(DOMAIN, &domain)
                    .env("SHMG_WORKER", worker.to_string())
                    .env("SHMG_SECS", secs.to_string())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::inherit())
                    .spawn()
                    .unwrap()
            };
            let children = vec![start(1, true), start(2, false), start(3, false)];
            let mut total = 0u64;
            for c in children {
                let mut c = c;
                let out = c.stdout.take().unwrap();
                let reader = std::thread::spawn(move || {
                    use std::io::Read;
                    let mut s = String::new();
                    let _ = std::io::BufReader::new(out).read_to_string(&mut s);
                    s
                });
                let status = wait(&mut c, Duration::from_secs(secs + 120));
                let text = reader.join().unwrap();
                assert!(status.success(), "a worker failed: {status}; {text}");
                let ops: u64 = text.lines().find_map(|l| l.strip_prefix("OPS=")).unwrap().trim().parse().unwrap();
                total += ops;
            }
            eprintln!("{total} allocations and frees in {secs} s by 3 processes (one in its own PID namespace)");
            heap.check().unwrap();
            // Stock left in the caches of exited threads is reclaimed by the next claimer.
            let p = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
            // SAFETY: freed right away.
            unsafe { heap.free(p).unwrap() };
            heap.flush_thread_cache().unwrap();
            heap.check().unwrap();
            let s = heap.stats().unwrap();
            assert_eq!(s.blocks.used_blocks, 0, "every block came back: {s:?}");
            drop(heap);
            d.delete_section("heap").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lock owners
// ---------------------------------------------------------------------------------------------

#[test]
fn a_mutex_holder_is_reported_alive_then_dead_by_its_token_not_its_pid() {
    const TEST: &str = "a_mutex_holder_is_reported_alive_then_dead_by_its_token_not_its_pid";
    match role().as_deref() {
        Some("holder") => {
            let d = child_attach();
            let heap = Heap::open(&d, "heap").unwrap();
            let m = heap.find::<shmgadget::sync::RawMutex>("m").unwrap();
            m.lock().unwrap();
            println!("HOLDING");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        _ => {
            let domain = unique_domain("owner");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "heap", 16 << 20).unwrap();
            let (m, _) = heap.find_or_zeroed::<shmgadget::sync::RawMutex>("m").unwrap();
            m.init().unwrap();
            assert_eq!(m.owner_alive(), None, "free");
            let mut holder = spawn(TEST, "holder", &domain, &[]);
            wait_for_line(&mut holder, "HOLDING");
            assert_eq!(m.owner_pid(), holder.id(), "the pid is shown");
            assert_eq!(m.owner_alive(), Some(true), "a live holder");
            kill9(&mut holder);
            assert_eq!(m.owner_alive(), Some(false), "a killed holder is dead at once");
            // The next locker is told, and the lock is ours (and alive) then.
            assert_eq!(m.lock().unwrap(), shmgadget::sync::Acquired::OwnerDied);
            assert_eq!(m.owner_alive(), Some(true));
            // SAFETY: we hold it.
            unsafe {
                m.make_consistent();
                m.unlock();
            }
            drop(heap);
            d.delete_section("heap").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
