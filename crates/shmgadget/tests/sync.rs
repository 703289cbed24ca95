//! Process-shared synchronisation across real processes, with `kill -9` where crashes matter.
#![cfg(unix)]

mod common;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use shmgadget::sync::{Condvar, Event, EventMode, LockError, Mutex, Semaphore};
use shmgadget::{Domain, DomainOptions, ErrorKind, Section, SectionOptions};

const GIB: u64 = 1 << 30;

fn open(name: &str) -> (Domain, Section) {
    let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap();
    let s = d.open_section(name).unwrap();
    (d, s)
}

fn setup(tag: &str, name: &str) -> (String, Domain, Section) {
    let domain = unique_domain(tag);
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let s = d.create_section(name, 1 << 20, &SectionOptions::new().transient()).unwrap();
    (domain, d, s)
}

fn finish(domain: String, d: Domain, s: Section) {
    drop(s);
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn a_killed_holder_is_reported_to_the_next_locker_until_repaired() {
    match role().as_deref() {
        Some("holder") => {
            let (_d, s) = open("m");
            let m = s.at::<Mutex<u64>>(0).unwrap();
            let mut g = m.lock().unwrap();
            *g = 41; // half-way through an update when it dies
            println!("HOLDING");
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => {
            let (domain, d, s) = setup("mutex-death", "m");
            let m = s.at::<Mutex<u64>>(0).unwrap();
            assert!(m.init(7).unwrap());
            let mut holder =
                spawn("a_killed_holder_is_reported_to_the_next_locker_until_repaired", "holder", &domain, &[]);
            wait_for_line(&mut holder, "HOLDING");
            assert!(matches!(m.try_lock(), Err(LockError::WouldBlock)), "held by the other process");
            assert!(matches!(m.lock_timeout(Duration::from_millis(20)), Err(LockError::Timeout)));
            assert_eq!(m.raw().owner_pid(), holder.id());
            let killed = Instant::now();
            kill9(&mut holder);
            let g = match m.lock() {
                Err(LockError::OwnerDied(g)) => g,
                other => panic!("expected OwnerDied, got {other:?}"),
            };
            let latency = killed.elapsed();
            eprintln!("owner death reported {latency:?} after kill -9 (including the reap)");
            assert!(latency < Duration::from_secs(1), "{latency:?}");
            assert_eq!(*g, 41, "the dead holder's partial write is visible for repair");
            drop(g); // not repaired: the next locker is told again
            let mut g = match m.lock() {
                Err(LockError::OwnerDied(g)) => g,
                other => panic!("still inconsistent, expected OwnerDied, got {other:?}"),
            };
            *g = 7;
            g.make_consistent();
            drop(g);
            let g = m.lock().unwrap_or_else(|e| panic!("repaired, expected a plain guard: {e:?}"));
            assert_eq!(*g, 7);
            drop(g);
            finish(domain, d, s);
        }
    }
}

#[test]
fn contending_processes_keep_a_consistent_counter_while_one_is_killed_repeatedly() {
    const TEST: &str = "contending_processes_keep_a_consistent_counter_while_one_is_killed_repeatedly";
    match role().as_deref() {
        Some("worker") => {
            let (_d, s) = open("c");
            let m = s.at::<Mutex<[u64; 2]>>(0).unwrap();
            let stop = s.at::<AtomicU32>(4096).unwrap();
            let repairs = s.at::<AtomicU64>(4104).unwrap();
            println!("STARTED");
            // Relaxed: a stop flag polled in a loop.
            while stop.load(Ordering::Relaxed) == 0 {
                let mut g = match m.lock() {
                    Ok(g) => g,
                    Err(LockError::OwnerDied(mut g)) => {
                        // The dead holder incremented [0] but maybe not [1]: finish its update.
                        g[1] = g[0];
                        g.make_consistent();
                        repairs.fetch_add(1, Ordering::Relaxed);
                        g
                    }
                    Err(e) => panic!("{e:?}"),
                };
                g[0] += 1;
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_micros(20) {
                    std::hint::spin_loop();
                }
                g[1] += 1;
            }
        }
        _ => {
            let (domain, d, s) = setup("mutex-kill", "c");
            let m = s.at::<Mutex<[u64; 2]>>(0).unwrap();
            m.init([0, 0]).unwrap();
            let start = |_: usize| {
                let mut c = spawn(TEST, "worker", &domain, &[]);
                wait_for_line(&mut c, "STARTED");
                c
            };
            let mut workers: Vec<_> = (0..4).map(start).collect();
            for round in 0..25 {
                std::thread::sleep(Duration::from_millis(15));
                let victim = round % 4;
                kill9(&mut workers[victim]);
                workers[victim] = start(victim);
            }
            s.at::<AtomicU32>(4096).unwrap().store(1, Ordering::Relaxed);
            for w in &mut workers {
                assert!(wait(w, Duration::from_secs(60)).success());
            }
            let g = match m.lock() {
                Ok(g) => g,
                Err(LockError::OwnerDied(mut g)) => {
                    g[1] = g[0];
                    g.make_consistent();
                    g
                }
                Err(e) => panic!("{e:?}"),
            };
            eprintln!(
                "{} increments, {} owner-death repairs",
                g[0],
                s.at::<AtomicU64>(4104).unwrap().load(Ordering::Relaxed)
            );
            assert_eq!(g[0], g[1], "every update is complete or repaired");
            assert!(g[0] > 0);
            drop(g);
            finish(domain, d, s);
        }
    }
}

#[test]
fn four_processes_passing_100k_semaphore_units_each_lose_none() {
    const N: u32 = 100_000;
    const TEST: &str = "four_processes_passing_100k_semaphore_units_each_lose_none";
    match role().as_deref() {
        Some("ring") => {
            let (_d, s) = open("sems");
            let i: usize = std::env::var("INDEX").unwrap().parse().unwrap();
            let mine = s.at::<Semaphore>(i * 64).unwrap();
            let next = s.at::<Semaphore>(((i + 1) % 4) * 64).unwrap();
            for _ in 0..N {
                next.post().unwrap();
                mine.wait().unwrap();
            }
        }
        Some("poster") => {
            let (_d, s) = open("sems");
            let shared = s.at::<Semaphore>(4 * 64).unwrap();
            for _ in 0..N {
                shared.post().unwrap();
            }
        }
        Some("waiter") => {
            let (_d, s) = open("sems");
            let shared = s.at::<Semaphore>(4 * 64).unwrap();
            for _ in 0..N {
                shared.wait().unwrap();
            }
        }
        _ => {
            let (domain, d, s) = setup("sem", "sems");
            for i in 0..5 {
                s.at::<Semaphore>(i * 64).unwrap().init(0).unwrap();
            }
            // A ring: each process posts to the next and waits on its own, 100k times.
            let mut children: Vec<_> =
                (0..4).map(|i| spawn(TEST, "ring", &domain, &[("INDEX", i.to_string())])).collect();
            // One shared semaphore: two processes post 100k each, two take 100k each.
            for role in ["poster", "poster", "waiter", "waiter"] {
                children.push(spawn(TEST, role, &domain, &[]));
            }
            for c in &mut children {
                assert!(wait(c, Duration::from_secs(240)).success(), "a process failed or hung");
            }
            for i in 0..5 {
                let sem = s.at::<Semaphore>(i * 64).unwrap();
                assert_eq!(sem.count().unwrap(), 0, "semaphore {i}: every post was taken exactly once");
                assert!(!sem.try_wait().unwrap());
            }
            finish(domain, d, s);
        }
    }
}

#[test]
fn condvar_and_events_lose_no_wakeups_between_processes() {
    const ROUNDS: u64 = 10_000;
    const TEST: &str = "condvar_and_events_lose_no_wakeups_between_processes";
    match role().as_deref() {
        Some("cv") => {
            let (_d, s) = open("cv");
            let me: u64 = std::env::var("INDEX").unwrap().parse().unwrap();
            let m = s.at::<Mutex<u64>>(0).unwrap();
            let cv = s.at::<Condvar>(128).unwrap();
            let mut g = m.lock().unwrap();
            loop {
                while *g % 2 != me && *g < 2 * ROUNDS {
                    g = cv.wait(g).unwrap();
                }
                if *g >= 2 * ROUNDS {
                    break;
                }
                *g += 1;
                cv.notify_all().unwrap();
            }
        }
        Some("ping") | Some("pong") => {
            let (_d, s) = open("cv");
            let (a, b) = (s.at::<Event>(256).unwrap(), s.at::<Event>(320).unwrap());
            let (give, take) = if role().as_deref() == Some("ping") { (a, b) } else { (b, a) };
            for i in 0..ROUNDS {
                if role().as_deref() == Some("ping") || i > 0 {
                    give.set().unwrap();
                }
                take.wait().unwrap();
            }
            if role().as_deref() == Some("pong") {
                give.set().unwrap();
            }
        }
        Some("gate") => {
            let (_d, s) = open("cv");
            s.at::<Event>(384).unwrap().wait().unwrap();
        }
        _ => {
            let (domain, d, s) = setup("cv", "cv");
            s.at::<Mutex<u64>>(0).unwrap().init(0).unwrap();
            s.at::<Condvar>(128).unwrap().init().unwrap();
            s.at::<Event>(256).unwrap().init(EventMode::Auto, false).unwrap();
            s.at::<Event>(320).unwrap().init(EventMode::Auto, false).unwrap();
            let gate = s.at::<Event>(384).unwrap();
            gate.init(EventMode::Manual, false).unwrap();
            let mut children = vec![
                spawn(TEST, "cv", &domain, &[("INDEX", "0".into())]),
                spawn(TEST, "cv", &domain, &[("INDEX", "1".into())]),
                spawn(TEST, "ping", &domain, &[]),
                spawn(TEST, "pong", &domain, &[]),
            ];
            let gated: Vec<_> = (0..3).map(|_| spawn(TEST, "gate", &domain, &[])).collect();
            std::thread::sleep(Duration::from_millis(100));
            gate.set().unwrap(); // a manual-reset event releases every waiter
            children.extend(gated);
            for c in &mut children {
                assert!(wait(c, Duration::from_secs(120)).success(), "a process failed or hung");
            }
            assert_eq!(*s.at::<Mutex<u64>>(0).unwrap().lock().unwrap(), 2 * ROUNDS);
            assert!(gate.is_set().unwrap(), "manual reset: stays set");
            finish(domain, d, s);
        }
    }
}

#[test]
fn processes_racing_to_initialise_one_semaphore_agree_on_one_initialiser() {
    match role().as_deref() {
        Some("init") => {
            let (_d, s) = open("init");
            let start: u128 = std::env::var("START_AT").unwrap().parse().unwrap();
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
            if start > now {
                std::thread::sleep(Duration::from_nanos((start - now) as u64));
            }
            let sem = s.at::<Semaphore>(0).unwrap();
            println!("INIT={}", sem.init(3).unwrap());
            println!("COUNT={}", sem.count().unwrap());
        }
        _ => {
            let (domain, d, s) = setup("sem-init", "init");
            let start = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() + 300_000_000;
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    let domain = domain.clone();
                    let env = [("START_AT", start.to_string())];
                    std::thread::spawn(move || {
                        run(
                            "processes_racing_to_initialise_one_semaphore_agree_on_one_initialiser",
                            "init",
                            &domain,
                            &env,
                        )
                    })
                })
                .collect();
            let reports: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(reports.iter().filter(|r| r["INIT"] == "true").count(), 1, "{reports:?}");
            assert!(reports.iter().all(|r| r["COUNT"] == "3"));
            finish(domain, d, s);
        }
    }
}

#[test]
fn uninitialised_corrupt_and_destroyed_objects_are_errors_not_hangs() {
    let (domain, d, s) = setup("sync-errors", "e");
    // Zeroed memory: not initialised.
    let sem = s.at::<Semaphore>(0).unwrap();
    let err = sem.wait_timeout(Duration::from_millis(10)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("init"), "{err}");
    let m = s.at::<Mutex<u64>>(128).unwrap();
    assert!(matches!(m.lock(), Err(LockError::Failed(e)) if e.kind() == ErrorKind::InvalidArgument));
    // Misplaced objects are refused.
    assert_eq!(s.at::<Semaphore>(3).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.at::<Semaphore>((1 << 20) - 16).unwrap_err().kind(), ErrorKind::InvalidArgument);
    // Corrupt magic, impossible counter.
    sem.init(1).unwrap();
    let words = s.as_ptr().cast::<u32>();
    // SAFETY: the semaphore's magic word (offset 4) and count (offset 16) in our own section;
    // we corrupt them on purpose, nobody else uses them.
    unsafe { words.add(1).write_volatile(0xdead_beef) };
    let err = sem.post().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("expected"), "{err}");
    // SAFETY: as above: restore the magic, then make the count impossible.
    unsafe {
        words.add(1).write_volatile(u32::from_le_bytes(*b"SEM1"));
        words.add(4).write_volatile(u32::MAX);
    }
    assert_eq!(sem.try_wait().unwrap_err().kind(), ErrorKind::Corrupt);
    // SAFETY: as above: a sane count again.
    unsafe { words.add(4).write_volatile(0) };
    // Destroying wakes a sleeping waiter with an error.
    let ev = s.at::<Event>(256).unwrap();
    ev.init(EventMode::Auto, false).unwrap();
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| sem.wait());
        let ev_waiter = scope.spawn(|| ev.wait_timeout(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        sem.destroy().unwrap();
        ev.destroy().unwrap();
        assert_eq!(waiter.join().unwrap().unwrap_err().kind(), ErrorKind::Destroyed);
        assert_eq!(ev_waiter.join().unwrap().unwrap_err().kind(), ErrorKind::Destroyed);
    });
    assert_eq!(sem.post().unwrap_err().kind(), ErrorKind::Destroyed);
    // Timeouts report Timeout.
    let sem2 = s.at::<Semaphore>(512).unwrap();
    sem2.init(0).unwrap();
    let t = Instant::now();
    assert_eq!(sem2.wait_timeout(Duration::from_millis(30)).unwrap_err().kind(), ErrorKind::Timeout);
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert!(!sem2.init(5).unwrap(), "a second init keeps the existing state");
    assert_eq!(sem2.count().unwrap(), 0);
    finish(domain, d, s);
}

/// A holder killed with SIGKILL while the next locker already sleeps on the lock: the sleeper
/// is told `OwnerDied` (the delay from the kill is printed; the only bound is a generous
/// watchdog, the lock's own 10 s timeout).
#[test]
fn a_sleeping_locker_is_told_owner_died_soon_after_the_holder_is_sigkilled() {
    const TEST: &str = "a_sleeping_locker_is_told_owner_died_soon_after_the_holder_is_sigkilled";
    match role().as_deref() {
        Some("holder") => {
            let (_d, s) = open("m");
            let m = s.at::<Mutex<u64>>(0).unwrap();
            let mut g = m.lock().unwrap();
            *g = 99;
            println!("HOLDING");
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => {
            let (domain, d, s) = setup("mutex-sigkill", "m");
            let m = s.at::<Mutex<u64>>(0).unwrap();
            assert!(m.init(1).unwrap());
            let mut holder = spawn(TEST, "holder", &domain, &[]);
            wait_for_line(&mut holder, "HOLDING");
            let killed_at = std::sync::Mutex::new(None::<Instant>);
            let delay = std::thread::scope(|sc| {
                let waiter = sc.spawn(|| {
                    let got = m.lock_timeout(Duration::from_secs(10));
                    let at = Instant::now();
                    match got {
                        Err(LockError::OwnerDied(mut g)) => {
                            assert_eq!(*g, 99, "the dead holder's write is visible");
                            *g = 1;
                            g.make_consistent();
                        }
                        other => panic!("expected OwnerDied, got {other:?}"),
                    }
                    at
                });
                // Let the waiter fall asleep on the lock first.
                std::thread::sleep(Duration::from_millis(100));
                // SAFETY: plain kill(2) on a child we spawned and have not reaped yet.
                assert_eq!(unsafe { libc::kill(holder.id() as i32, libc::SIGKILL) }, 0);
                *killed_at.lock().unwrap() = Some(Instant::now());
                let got_at = waiter.join().unwrap();
                got_at.saturating_duration_since(killed_at.lock().unwrap().unwrap())
            });
            eprintln!("owner death reported to a sleeping locker {delay:?} after SIGKILL (no reap first)");
            let _ = holder.wait();
            assert_eq!(*m.lock().unwrap_or_else(|e| panic!("repaired, expected a plain guard: {e:?}")), 1);
            finish(domain, d, s);
        }
    }
}

/// A thread that exits holding the lock while its process lives counts as dead: the next
/// locker in the same process and one in another process (already asleep on the lock) are
/// told `OwnerDied`, and the data the thread wrote is there to repair.
#[test]
fn a_thread_that_exits_holding_the_lock_is_reported_in_its_own_and_other_processes() {
    const TEST: &str = "a_thread_that_exits_holding_the_lock_is_reported_in_its_own_and_other_processes";
    match role().as_deref() {
        Some("exiter") => {
            let (_d, s) = open("m");
            let m = s.at::<Mutex<u64>>(0).unwrap();
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    let mut g = m.lock().unwrap();
                    *g = 5;
                    println!("HOLDING");
                    // Give the other process time to fall asleep on the lock.
                    std::thread::sleep(Duration::from_millis(300));
                    std::mem::forget(g); // the thread ends holding it
                });
            });
            println!("THREAD EXITED");
            // The process lives on; the parent kills it when done.
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => {
            let (domain, d, s) = setup("mutex-thread-exit", "m");
            let m = s.at::<Mutex<u64>>(0).unwrap();
            assert!(m.init(0).unwrap());

            // Same process: a thread locks, forgets its guard and exits.
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    let mut g = m.lock().unwrap();
                    *g = 3;
                    std::mem::forget(g);
                });
            });
            match m.lock_timeout(Duration::from_secs(10)) {
                Err(LockError::OwnerDied(mut g)) => {
                    assert_eq!(*g, 3);
                    *g = 0;
                    g.make_consistent();
                }
                other => panic!("same process: expected OwnerDied, got {other:?}"),
            }
            assert!(m.lock().is_ok(), "repaired");

            // Another process: its thread exits holding the lock while we sleep on it.
            let mut exiter = spawn(TEST, "exiter", &domain, &[]);
            wait_for_line(&mut exiter, "HOLDING");
            let start = Instant::now();
            match m.lock_timeout(Duration::from_secs(10)) {
                Err(LockError::OwnerDied(mut g)) => {
                    assert_eq!(*g, 5);
                    *g = 0;
                    g.make_consistent();
                }
                other => panic!("other process: expected OwnerDied, got {other:?}"),
            }
            eprintln!("a thread's exit in another process reported after {:?} of waiting", start.elapsed());
            assert!(exiter.try_wait().unwrap().is_none(), "the exiting thread's process is still alive");
            assert!(m.lock().is_ok(), "repaired");
            kill9(&mut exiter);
            finish(domain, d, s);
        }
    }
}

/// A guard leaked with `mem::forget` keeps its lock until its thread exits, and the exit
/// releases it as a dead holder's (the next locker gets `OwnerDied`). If the lock's section was deleted and unmapped
/// meanwhile, the exit leaves the gone memory alone instead of writing to it (a SIGSEGV in the
/// child before the thread-exit path checked).
#[test]
fn a_leaked_guard_is_released_at_thread_exit_unless_its_section_was_unmapped_first() {
    const TEST: &str = "a_leaked_guard_is_released_at_thread_exit_unless_its_section_was_unmapped_first";
    match role().as_deref() {
        Some("leaker") => {
            let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap();
            // One thread that takes the lock of section `name`, leaks its guard and drops its
            // handle, then exits when told.
            let leak = |name: &'static str| {
                let (d, (held_tx, held_rx), (go_tx, go_rx)) =
                    (d.clone(), std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
                let t = std::thread::spawn(move || {
                    let s = d.open_section(name).unwrap();
                    std::mem::forget(s.at::<Mutex<u64>>(0).unwrap().lock().unwrap());
                    drop(s);
                    held_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                });
                held_rx.recv().unwrap();
                (t, go_tx)
            };
            let opts = SectionOptions::new().transient();
            // Still mapped at the exit: released.
            let kept = d.create_section("kept", 1 << 20, &opts).unwrap();
            let m = kept.at::<Mutex<u64>>(0).unwrap();
            assert!(m.init(1).unwrap());
            let (t, go) = leak("kept");
            assert!(matches!(m.try_lock(), Err(LockError::WouldBlock)), "the leaked guard holds it");
            go.send(()).unwrap();
            t.join().unwrap();
            match m.lock() {
                Err(LockError::OwnerDied(g)) => assert_eq!(*g, 1),
                other => panic!("the exit releases the lock as its holder's death: {other:?}"),
            }
            // Deleted and unmapped before the exit: left alone, and the process carries on.
            let gone = d.create_section("gone", 1 << 20, &opts).unwrap();
            assert!(gone.at::<Mutex<u64>>(0).unwrap().init(2).unwrap());
            let (t, go) = leak("gone");
            drop(gone);
            d.delete_section("gone").unwrap();
            go.send(()).unwrap();
            t.join().unwrap();
            drop(kept);
            d.delete_section("kept").unwrap();
            println!("EXITED=2");
        }
        _ => {
            let domain = unique_domain("leakedguard");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let report = run(TEST, "leaker", &domain, &[]);
            assert_eq!(report.get("EXITED").map(String::as_str), Some("2"));
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
