//! Loom models of the futex-word algorithms (semaphore, event, racing initialisation): every
//! interleaving of the real code, with loom's atomics and a model futex (see `sync/shim.rs`).
//! A lost wake-up shows up as a deadlock, which loom reports.
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
