//! Loom models of the futex-word algorithms (semaphore, event, racing initialisation) and of
//! the queues (including a byte-queue receiver that dies holding a message and is replaced):
//! every interleaving of the real code, with loom's atomics and a model futex (see
//! `sync/shim.rs`). A lost wake-up shows up as a deadlock, which loom reports.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p shmgadget --test loom --release`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use shmgadget::sync::{Event, EventMode, Semaphore};

#[test]
fn a_post_always_reaches_a_sleeping_waiter() {
    loom::model(|| {
        let sem = Arc::new(Semaphore::new_uninit());
        sem.init(0).unwrap();
        let poster = {
            let sem = sem.clone();
            thread::spawn(move || sem.post().unwrap())
        };
        sem.wait().unwrap();
        poster.join().unwrap();
        assert_eq!(sem.count().unwrap(), 0);
    });
}

#[test]
fn two_waiters_two_posters_take_each_unit_once() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let sem = Arc::new(Semaphore::new_uninit());
        sem.init(0).unwrap();
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let sem = sem.clone();
                thread::spawn(move || if i == 0 { sem.post().unwrap() } else { sem.wait().unwrap() })
            })
            .collect();
        sem.post().unwrap();
        sem.wait().unwrap();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(sem.count().unwrap(), 0);
    });
}

#[test]
fn an_auto_reset_event_wakes_its_waiter_and_resets() {
    loom::model(|| {
        let ev = Arc::new(Event::new_uninit());
        ev.init(EventMode::Auto, false).unwrap();
        let setter = {
            let ev = ev.clone();
            thread::spawn(move || ev.set().unwrap())
        };
        ev.wait().unwrap();
        setter.join().unwrap();
        assert!(!ev.is_set().unwrap(), "the successful wait consumed the event");
    });
}

#[test]
fn a_manual_event_releases_every_waiter() {
    loom::model(|| {
        let ev = Arc::new(Event::new_uninit());
        ev.init(EventMode::Manual, false).unwrap();
        let waiter = {
            let ev = ev.clone();
            thread::spawn(move || ev.wait().unwrap())
        };
        ev.set().unwrap();
        ev.wait().unwrap();
        waiter.join().unwrap();
        assert!(ev.is_set().unwrap());
    });
}

#[test]
fn racing_initialisers_agree_on_one() {
    loom::model(|| {
        let sem = Arc::new(Semaphore::new_uninit());
        let other = {
            let sem = sem.clone();
            thread::spawn(move || sem.init(2).unwrap())
        };
        let mine = sem.init(2).unwrap();
        let theirs = other.join().unwrap();
        assert!(mine ^ theirs, "exactly one initialises");
        assert_eq!(sem.count().unwrap(), 2);
    });
}

#[test]
fn byte_queue_delivers_whole_messages_in_order_through_full_waits_and_wraps() {
    use shmgadget::queue::ByteQueue;
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        // A 64-byte ring holds two 20-byte messages: the third send waits for space, and the
        // records wrap around the end.
        let q = Arc::new(ByteQueue::in_memory(64));
        let sender = {
            let q = q.clone();
            thread::spawn(move || {
                let mut tx = q.sender().unwrap();
                for i in 0..3u8 {
                    tx.send(&[i; 20]).unwrap();
                }
            })
        };
        let mut rx = q.receiver().unwrap();
        for i in 0..3u8 {
            let m = rx.recv().unwrap();
            assert_eq!(&*m, &[i; 20]);
        }
        sender.join().unwrap();
        // The sender left: the receiver is told, not left waiting.
        assert!(rx.recv().is_err());
    });
}

#[test]
fn slot_queue_two_senders_one_receiver_deliver_every_value_once_in_order_through_a_full_ring() {
    use shmgadget::queue::SlotQueue;
    let mut builder = loom::model::Builder::new();
    // One preemption (plus every switch forced by blocking) explores this model in seconds;
    // two take minutes, too long for CI.
    builder.preemption_bound = Some(1);
    builder.check(|| {
        // Two slots, two senders with two values each: senders wait for space, the receiver
        // for values, positions are claimed by CAS from both sides.
        let q = Arc::new(SlotQueue::<u32>::in_memory(2));
        // A sender attached throughout: "every sender gone" must not be decided before both
        // workers have attached (a later attach is a new connection).
        let keep = q.sender().unwrap();
        let senders: Vec<_> = (0..2u32)
            .map(|id| {
                let q = q.clone();
                thread::spawn(move || {
                    let mut tx = q.sender().unwrap();
                    // Three values in two slots: someone waits for space.
                    for i in 0..(2 - id) {
                        tx.send(id * 10 + i).unwrap();
                    }
                })
            })
            .collect();
        let mut rx = q.receiver().unwrap();
        let mut got: Vec<u32> = (0..3).map(|_| rx.recv().unwrap()).collect();
        for s in senders {
            s.join().unwrap();
        }
        drop(keep);
        assert!(rx.recv().is_err(), "every sender gone and nothing left: disconnected");
        // Per sender in order, all four exactly once.
        let from = |id: u32| got.iter().copied().filter(|v| v / 10 == id).collect::<Vec<_>>();
        assert_eq!(from(0), vec![0, 1]);
        assert_eq!(from(1), vec![10]);
        got.sort();
        assert_eq!(got, vec![0, 1, 10]);
    });
}

#[test]
fn a_byte_queue_receiver_taking_over_from_a_dead_one_starts_with_the_message_it_held() {
    use shmgadget::ErrorKind;
    use shmgadget::queue::ByteQueue;
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        // A 64-byte ring and messages of i bytes (records of 8, 16, 16, 16, 16 bytes): the
        // first is consumed but its space may not be given back yet (under a quarter ring);
        // the last waits for space that only the successor can give back.
        let q = Arc::new(ByteQueue::in_memory(64));
        let sender = {
            let q = q.clone();
            thread::spawn(move || {
                let mut tx = q.sender().unwrap();
                for i in 0..5u8 {
                    loop {
                        match tx.send(&vec![i; i as usize]) {
                            Ok(()) => break,
                            // Between the death and the takeover there is no receiver; the
                            // refused message was not written.
                            Err(e) if e.kind() == ErrorKind::Disconnected => thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        };
        let mut rx = q.receiver().unwrap();
        assert_eq!(rx.recv().unwrap().len(), 0);
        // Received, in hand, when the receiver dies.
        let held = rx.recv().unwrap();
        assert_eq!(&*held, &[1]);
        std::mem::forget(held);
        rx.__die();
        // The successor (ordered after the death, as the kernel's liveness check orders it).
        let mut rx = q.receiver().unwrap();
        for i in 1..5u8 {
            assert_eq!(&*rx.recv().unwrap(), &vec![i; i as usize][..], "the held message first, then the rest");
        }
        sender.join().unwrap();
        assert!(rx.recv().is_err());
    });
}

#[test]
fn a_byte_queue_with_two_lanes_keeps_order_through_switches_and_a_sender_taking_over() {
    use shmgadget::ErrorKind;
    use shmgadget::queue::ByteQueue;
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        // A 64-byte hot lane holds two 16-byte messages (24-byte records and the 8 bytes kept
        // for a switch record): the third overflows into the 256-byte main lane when the
        // sender would otherwise sleep, and the sender comes back once the hot lane drains.
        // The first sender dies with its last message unpublished (a batch of 64 bytes: the
        // message and a switch record are 32); its successor continues in the lane the
        // published position names.
        let q = Arc::new(ByteQueue::in_memory_lanes(256, 64));
        let sender = {
            let q = q.clone();
            thread::spawn(move || {
                let send = |tx: &mut shmgadget::queue::ByteSender<'_>, i: u8| loop {
                    match tx.send(&[i; 16]) {
                        Ok(()) => break,
                        Err(e) if e.kind() == ErrorKind::Disconnected => thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                };
                let mut tx = q.sender().unwrap();
                for i in 0..3u8 {
                    send(&mut tx, i);
                }
                tx.set_batch(64);
                // Written, never published: lost with its sender.
                tx.send(&[99; 16]).unwrap();
                tx.__die();
                let mut tx = q.sender().unwrap();
                for i in 3..5u8 {
                    send(&mut tx, i);
                }
            })
        };
        let mut rx = q.receiver().unwrap();
        let mut i = 0u8;
        while i < 5 {
            match rx.recv() {
                Ok(m) => {
                    assert_eq!(&*m, &[i; 16], "in order, the unpublished message never seen");
                    i += 1;
                }
                // Between the death and the takeover there is no sender.
                Err(e) if e.kind() == ErrorKind::Disconnected => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        sender.join().unwrap();
        assert!(rx.recv().is_err());
    });
}

#[test]
fn a_byte_queue_receiver_taking_over_in_the_main_lane_resumes_in_the_right_lane() {
    use shmgadget::queue::ByteQueue;
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        // Three 16-byte messages: the third goes to the main lane (the hot lane holds two).
        // The receiver dies holding one of the first two, or after a switch, and its successor
        // resumes from the consumed positions of both lanes and the lane it was in.
        let q = Arc::new(ByteQueue::in_memory_lanes(128, 64));
        let sender = {
            let q = q.clone();
            thread::spawn(move || {
                let mut tx = q.sender().unwrap();
                for i in 0..4u8 {
                    tx.send(&[i; 16]).unwrap();
                }
            })
        };
        let mut rx = q.receiver().unwrap();
        assert_eq!(&*rx.recv().unwrap(), &[0; 16]);
        let kept = rx.recv().unwrap().keep();
        let held = rx.recv().unwrap();
        assert_eq!(&*held, &[2; 16]);
        std::mem::forget(held);
        let _ = kept;
        rx.__die();
        let mut rx = q.receiver().unwrap();
        for i in 1..4u8 {
            assert_eq!(&*rx.recv().unwrap(), &[i; 16], "the kept and the held message again, then the rest");
        }
        sender.join().unwrap();
        assert!(rx.recv().is_err());
    });
}

// ---------------------------------------------------------------------------------------------
// shmgadget's own robust lock (`sync/robust.rs`), the lock of `Mutex<T>` and the registry
// ---------------------------------------------------------------------------------------------

mod robust_lock {
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use loom::thread;
    use shmgadget::sync::{ModelLockOutcome as Outcome, ModelRobustLock as Lock};

    /// Every holder is alive: `alive` answers for the tokens 1 and 2 of the model's two
    /// "processes".
    fn all_alive(_: u64) -> Option<bool> {
        Some(true)
    }

    /// Two threads each take the lock twice and increment a counter in two non-atomic steps
    /// (a load, then a store): with mutual exclusion no increment is lost.
    #[test]
    fn robust_lock_excludes_and_loses_no_increment() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(|| {
            let lock = Arc::new(Lock::new_model());
            let count = Arc::new(AtomicU32::new(0));
            let worker = |token: u64, lock: Arc<Lock>, count: Arc<AtomicU32>| {
                move || {
                    for _ in 0..2 {
                        let got = lock.lock_looking(token, None, None, &all_alive).unwrap();
                        assert_eq!(got, Some(Outcome::Acquired));
                        // Relaxed: the lock orders it (a lost increment shows up below).
                        let v = count.load(Ordering::Relaxed);
                        count.store(v + 1, Ordering::Relaxed);
                        // SAFETY: taken just above by this thread.
                        unsafe { lock.unlock() };
                    }
                }
            };
            let t = thread::spawn(worker(1, lock.clone(), count.clone()));
            worker(2, lock.clone(), count.clone())();
            t.join().unwrap();
            assert_eq!(count.load(Ordering::Relaxed), 4);
        });
    }

    /// A waiter that sleeps on the lock with no timeout (every sleep until woken) is woken by
    /// the unlock: a lost wake-up would leave it asleep for ever, which loom reports as a
    /// deadlock.
    #[test]
    fn robust_lock_waiter_is_always_woken_by_the_unlock() {
        loom::model(|| {
            let lock = Arc::new(Lock::new_model());
            assert_eq!(lock.try_lock(1).unwrap(), Some(Outcome::Acquired));
            let waiter = {
                let lock = lock.clone();
                thread::spawn(move || {
                    let got = lock.lock_looking(2, None, None, &all_alive).unwrap();
                    assert_eq!(got, Some(Outcome::Acquired));
                    // SAFETY: taken just above by this thread.
                    unsafe { lock.unlock() };
                })
            };
            // SAFETY: taken by this thread at the start.
            unsafe { lock.unlock() };
            waiter.join().unwrap();
            assert_eq!(lock.word(), 0, "free at the end");
        });
    }

    /// The holder "dies" (its process's token stops being alive; it never unlocks) while
    /// another waits on the lock: the waiter is told `OwnerDied` and sees what the dead holder
    /// wrote; every locker after it is told `OwnerDied` too until one calls `make_consistent`.
    #[test]
    fn robust_lock_owner_death_is_handed_to_the_next_locker_until_made_consistent() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(|| {
            let lock = Arc::new(Lock::new_model());
            let has_it = Arc::new(AtomicBool::new(false));
            let dead = Arc::new(AtomicBool::new(false));
            let data = Arc::new(AtomicU32::new(0));
            let holder = {
                let (lock, has_it, dead, data) = (lock.clone(), has_it.clone(), dead.clone(), data.clone());
                thread::spawn(move || {
                    assert_eq!(lock.try_lock(1).unwrap(), Some(Outcome::Acquired));
                    // Relaxed: the model's own signal, ordered by nothing it checks.
                    has_it.store(true, Ordering::Relaxed);
                    // Relaxed: under the lock.
                    data.store(41, Ordering::Relaxed);
                    // Dies holding it: its token stops being alive; nothing is unlocked.
                    dead.store(true, Ordering::Release);
                })
            };
            // Relaxed: only to start waiting once the holder has the lock.
            while !has_it.load(Ordering::Relaxed) {
                thread::yield_now();
            }
            // Acquire: pairs with the holder's Release store of `dead` (as the kernel's lock
            // table orders a dead process's writes before its token reads as dead).
            let alive = |t: u64| Some(!(t == 1 && dead.load(Ordering::Acquire)));
            // Timed sleeps (the model's timeouts expire at once) so the waiter looks at the
            // holder, as the real 10 ms looks do.
            let look = Some(std::time::Duration::from_millis(10));
            let got = lock.lock_looking(2, None, look, &alive).unwrap();
            holder.join().unwrap();
            assert_eq!(got, Some(Outcome::OwnerDied));
            // Relaxed: the takeover came after `dead` was seen (Acquire) or through the word.
            assert_eq!(data.load(Ordering::Relaxed), 41, "the dead holder's write is there to repair");
            // SAFETY: we hold it.
            unsafe { lock.unlock() };
            assert_eq!(lock.try_lock(2).unwrap(), Some(Outcome::OwnerDied), "sticky until repaired");
            // SAFETY: we hold it.
            unsafe { lock.make_consistent() }.unwrap();
            // SAFETY: we hold it.
            unsafe { lock.unlock() };
            assert_eq!(lock.try_lock(2).unwrap(), Some(Outcome::Acquired), "repaired");
        });
    }
}
