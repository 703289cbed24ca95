//! `shm_delete_section` and `shm_exit` racing with hot calls on other threads: every call gets
//! a result or a clean error code, never a crash or a use of unmapped memory.
//!
//! Each test re-executes this binary (the `role` test with `SHM_NT_RACE_ROLE` set) so the
//! library's process state and the domain (`SHMGADGET_DOMAIN`) are the child's own; the parent
//! watches it with a timeout and checks that it finished and left nothing in /dev/shm.

// `unsigned long` is 64 bits here but 32 on Windows: keep the casts.
#![allow(clippy::unnecessary_cast)]

mod common;

use std::ffi::CStr;
use std::os::raw::c_void;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shm_nt::*;

const ROLE: &str = "SHM_NT_RACE_ROLE";

fn last_error() -> String {
    // SAFETY: shm_last_error returns a NUL-terminated string valid until the next failure.
    unsafe { CStr::from_ptr(shm_last_error()) }.to_string_lossy().into_owned()
}

fn run_child(role: &str) {
    let domain = format!("race-{role}-{}", std::process::id());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "role", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env("SHMGADGET_DOMAIN", &domain)
        .spawn()
        .unwrap();
    let status = common::wait_bounded(&mut child, Duration::from_secs(120), &format!("{role}: the child"));
    let left = common::leftovers(&domain);
    if !left.is_empty() {
        let opts = shmgadget::DomainOptions { must_exist: true, ..Default::default() };
        if let Ok(d) = shmgadget::Domain::attach_with(&domain, &opts) {
            for s in d.sections() {
                let _ = d.delete_section(&s.name);
            }
            let _ = d.detach();
        }
    }
    assert!(status.success(), "{role}: the child failed: {status}");
    assert!(left.is_empty(), "{role}: left in /dev/shm: {left:?}");
}

/// Entry point of the child processes (does nothing in a normal test run).
#[test]
fn role() {
    match std::env::var(ROLE).as_deref() {
        Ok("delete") => delete_while_in_use(),
        Ok("exit") => exit_while_in_use(),
        Ok("churn") => delete_while_threads_come_and_go(false),
        Ok("churn-heap") => delete_while_threads_come_and_go(true),
        _ => {}
    }
}

#[test]
fn deleting_a_heap_or_queue_while_other_threads_use_it_gives_them_clean_errors() {
    run_child("delete");
}

#[test]
fn shm_exit_while_other_threads_use_heaps_and_queues_gives_them_results_or_clean_errors() {
    run_child("exit");
}

#[test]
fn deleting_queues_while_short_lived_threads_use_them_gives_them_clean_errors() {
    run_child("churn");
}

/// As above, deleting heaps too: each exiting thread gives its heap cache back
/// (`LocalCache::drop` in shmgadget/src/heap/cache.rs) while another thread may be unmapping
/// that heap. Before the exit flush pinned the section, this crashed (SIGSEGV) in 2 to 5 runs
/// of 10.
#[test]
fn deleting_heaps_while_short_lived_threads_use_them_gives_them_clean_errors() {
    run_child("churn-heap");
}

/// Handles the workers use; 0 while none.
struct Shared {
    heap: AtomicU64,
    queue: AtomicU64,
    stop: AtomicBool,
    calls: AtomicU64,
}

fn ok_or_clean(rc: i32, what: &str) {
    let clean = [SHM_OK, SHM_ERR_INVALID, SHM_ERR_NOT_FOUND, SHM_ERR_TIMEOUT, SHM_ERR_DISCONNECTED];
    assert!(clean.contains(&rc), "{what} returned {rc}: {}", last_error());
}

/// Allocates, frees and reallocates from the current heap, writes and reads the current queue,
/// and checks that every result is a success or a clean error. Touches block memory only
/// through the library.
fn worker(s: Arc<Shared>, writer: bool) {
    worker_for(s, writer, u64::MAX)
}

/// [`worker`] for at most `rounds` rounds.
fn worker_for(s: Arc<Shared>, writer: bool, rounds: u64) {
    let mut held: Vec<*mut c_void> = Vec::new();
    let mut buf = [0u8; 64];
    for _ in 0..rounds {
        if s.stop.load(Ordering::Relaxed) {
            break;
        }
        let h = s.heap.load(Ordering::Acquire) as usize;
        let p = shm_alloc(h, 100);
        if !p.is_null() {
            held.push(p);
        } else {
            assert!(!last_error().is_empty());
        }
        if held.len() > 8 {
            let p = held.remove(0);
            let p2 = shm_realloc(p, 300);
            let victim = if p2.is_null() { p } else { p2 };
            ok_or_clean(shm_free(victim), "shm_free");
        }
        let q = s.queue.load(Ordering::Acquire) as usize;
        if writer {
            // SAFETY: `buf` is 64 readable bytes.
            ok_or_clean(unsafe { shm_q_write(q, buf.as_ptr().cast(), 16, 0) }, "shm_q_write");
        } else {
            // SAFETY: `buf` is 64 writable bytes.
            let n = unsafe { shm_q_read(q, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                ok_or_clean(n as i32, "shm_q_read");
            } else {
                assert_eq!(n, 16);
            }
        }
        s.calls.fetch_add(1, Ordering::Relaxed);
    }
    for p in held {
        ok_or_clean(shm_free(p), "shm_free");
    }
}

fn make(name: &str, s: &Shared, round: u32) {
    let (mut h, mut q) = (0, 0);
    let heap = std::ffi::CString::new(format!("{name}.heap.{round}")).unwrap();
    let queue = std::ffi::CString::new(format!("{name}.q.{round}")).unwrap();
    assert_eq!(shm_heap(heap.as_ptr(), 4 << 20, &mut h, 0), SHM_OK, "{}", last_error());
    assert_eq!(shm_queue(queue.as_ptr(), 64 << 10, &mut q), SHM_OK, "{}", last_error());
    s.heap.store(h as u64, Ordering::Release);
    s.queue.store(q as u64, Ordering::Release);
}

fn make_queue(name: &str, s: &Shared, round: u32) {
    let mut q = 0;
    let queue = std::ffi::CString::new(format!("{name}.q.{round}")).unwrap();
    assert_eq!(shm_queue(queue.as_ptr(), 64 << 10, &mut q), SHM_OK, "{}", last_error());
    s.queue.store(q as u64, Ordering::Release);
}

fn start(s: &Arc<Shared>) -> Vec<std::thread::JoinHandle<()>> {
    (0..4)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || worker(s, i % 2 == 0))
        })
        .collect()
}

/// Waits until the workers made `n` more calls (so the race really happens mid-stream).
fn let_run(s: &Shared, n: u64) {
    let target = s.calls.load(Ordering::Relaxed) + n;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.calls.load(Ordering::Relaxed) < target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn delete_while_in_use() {
    let s = Arc::new(Shared {
        heap: AtomicU64::new(0),
        queue: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        calls: AtomicU64::new(0),
    });
    make("del", &s, 0);
    let workers = start(&s);
    for round in 1..=20 {
        let_run(&s, 200);
        let (h, q) = (s.heap.load(Ordering::Relaxed), s.queue.load(Ordering::Relaxed));
        // Delete while the workers still use them; they go on using the old handles for a
        // while (errors), then get new ones.
        assert_eq!(shm_delete_section(h as usize), SHM_OK, "{}", last_error());
        assert_eq!(shm_delete_section(q as usize), SHM_OK, "{}", last_error());
        let_run(&s, 200);
        make("del", &s, round);
    }
    s.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(shm_delete_section(s.heap.load(Ordering::Relaxed) as usize), SHM_OK);
    assert_eq!(shm_delete_section(s.queue.load(Ordering::Relaxed) as usize), SHM_OK);
    assert_eq!(shm_exit(), SHM_OK);
    println!("delete races done: {} calls", s.calls.load(Ordering::Relaxed));
}

fn exit_while_in_use() {
    let s = Arc::new(Shared {
        heap: AtomicU64::new(0),
        queue: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        calls: AtomicU64::new(0),
    });
    make("exit", &s, 0);
    let workers = start(&s);
    for _ in 0..20 {
        let_run(&s, 200);
        // Detach under the workers' feet; their next calls attach again.
        assert_eq!(shm_exit(), SHM_OK, "{}", last_error());
    }
    s.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (mut h, mut q) = (0, 0);
    assert!(shm_heap(c"exit.heap.0".as_ptr(), 4 << 20, &mut h, 0) >= 0, "{}", last_error());
    assert!(shm_queue(c"exit.q.0".as_ptr(), 64 << 10, &mut q) >= 0, "{}", last_error());
    let mut a = 0;
    // The heap must be consistent after all that.
    assert_eq!(shm_heap_check(h), SHM_OK, "{}", last_error());
    assert_eq!(shm_map(c"exit.heap.0".as_ptr(), 0, &mut a), SHM_OK);
    assert_eq!(shm_delete_section(h), SHM_OK, "{}", last_error());
    assert_eq!(shm_delete_section(q), SHM_OK, "{}", last_error());
    assert_eq!(shm_exit(), SHM_OK);
    println!("exit races done: {} calls", s.calls.load(Ordering::Relaxed));
}

/// As `delete_while_in_use`, with workers that each live for a few dozen calls: a thread's
/// hazard record is found from its thread pointer, which a new thread reuses once the old one
/// exited, and records pass from exited threads to new ones (far more threads than records).
/// Deletes the queues only, or the heaps too when `heaps`.
fn delete_while_threads_come_and_go(heaps: bool) {
    let s = Arc::new(Shared {
        heap: AtomicU64::new(0),
        queue: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        calls: AtomicU64::new(0),
    });
    make("churn", &s, 0);
    let spawner = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut threads = 0u64;
            while !s.stop.load(Ordering::Relaxed) {
                let wave: Vec<_> = (0..4)
                    .map(|i| {
                        let s = s.clone();
                        std::thread::spawn(move || worker_for(s, i % 2 == 0, 30))
                    })
                    .collect();
                threads += wave.len() as u64;
                for w in wave {
                    w.join().unwrap();
                }
            }
            threads
        })
    };
    for round in 1..=20 {
        let_run(&s, 300);
        let (h, q) = (s.heap.load(Ordering::Relaxed), s.queue.load(Ordering::Relaxed));
        if heaps {
            assert_eq!(shm_delete_section(h as usize), SHM_OK, "{}", last_error());
        }
        assert_eq!(shm_delete_section(q as usize), SHM_OK, "{}", last_error());
        let_run(&s, 300);
        if heaps {
            make("churn", &s, round);
        } else {
            make_queue("churn", &s, round);
        }
    }
    s.stop.store(true, Ordering::Relaxed);
    let threads = spawner.join().unwrap();
    assert!(threads > 256, "only {threads} threads ran: the records were not all reused");
    assert_eq!(shm_delete_section(s.heap.load(Ordering::Relaxed) as usize), SHM_OK);
    assert_eq!(shm_delete_section(s.queue.load(Ordering::Relaxed) as usize), SHM_OK);
    assert_eq!(shm_exit(), SHM_OK);
    println!("churn races done: {} calls by {threads} threads", s.calls.load(Ordering::Relaxed));
}
