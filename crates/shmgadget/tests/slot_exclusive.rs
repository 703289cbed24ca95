//! Exclusive slot-queue peers (tunnel ends) between real processes: read-ahead that survives
//! `kill -9` of the reader, and a killed exclusive sender whose unfinished send becomes a hole
//! that its successor can name (and that nobody waits at).
#![cfg(unix)]

mod common;

use std::time::Duration;

use common::*;
use shmgadget::queue::SlotQueue;
use shmgadget::{Domain, DomainOptions, ErrorKind};

const GIB: u64 = 1 << 30;

fn child() -> Domain {
    Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap()
}

#[test]
fn values_read_ahead_by_a_killed_exclusive_receiver_are_read_again_by_its_successor() {
    const TEST: &str = "values_read_ahead_by_a_killed_exclusive_receiver_are_read_again_by_its_successor";
    match role().as_deref() {
        Some("reader") => {
            let d = child();
            let q = SlotQueue::<u64>::open(&d, "ahead").unwrap();
            let mut rx = q.exclusive_receiver().unwrap();
            // Reads five ahead, commits the first two, then waits to be killed.
            let mut seqs = Vec::new();
            for _ in 0..5 {
                let (seq, v) = rx.peek_timeout(Duration::from_secs(10)).unwrap();
                assert_eq!(v, seq * 10);
                seqs.push(seq);
            }
            rx.commit(seqs[1]).unwrap();
            println!("READ={}", rx.consumed());
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("qexcl");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<u64>::create(&d, "ahead", 8).unwrap();
            let mut tx = q.sender().unwrap();
            for i in 1..=6 {
                tx.send(i * 10).unwrap();
            }
            let mut reader = spawn(TEST, "reader", &domain, &[]);
            wait_for_line(&mut reader, "READ=2");
            // While it lives nobody else may receive.
            assert_eq!(q.receiver().err().unwrap().kind(), ErrorKind::AlreadyExists);
            assert_eq!(q.exclusive_receiver().err().unwrap().kind(), ErrorKind::AlreadyExists);
            kill9(&mut reader);
            // Its successor reads again what it read ahead and did not commit.
            let mut rx = q.exclusive_receiver().unwrap();
            assert_eq!(rx.consumed(), 2);
            let got: Vec<(u64, u64)> = (0..4).map(|_| rx.peek_timeout(Duration::from_secs(5)).unwrap()).collect();
            assert_eq!(got, vec![(3, 30), (4, 40), (5, 50), (6, 60)]);
            assert_eq!(rx.peek_timeout(Duration::from_millis(50)).unwrap_err().kind(), ErrorKind::Timeout);
            // Uncommitted values hold their slots: 4 held + 4 free of 8.
            for i in 7..=10 {
                tx.try_send(i * 10).unwrap();
            }
            assert_eq!(tx.try_send(0).unwrap_err().kind(), ErrorKind::WouldBlock);
            assert_eq!(rx.commit(11).unwrap_err().kind(), ErrorKind::InvalidArgument);
            rx.commit(6).unwrap();
            tx.try_send(110).unwrap();
            assert_eq!(rx.peek_timeout(Duration::from_secs(1)).unwrap(), (7, 70));
            drop(rx);
            // A plain receiver may come once the exclusive one left, and takes what is left.
            let mut plain = q.receiver().unwrap();
            assert_eq!(plain.recv().unwrap(), 70);
            assert_eq!(q.exclusive_receiver().err().unwrap().kind(), ErrorKind::AlreadyExists);
            drop((plain, tx));
            drop(q);
            d.delete_section("ahead").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn an_exclusive_sender_killed_mid_send_leaves_a_hole_that_says_so() {
    const TEST: &str = "an_exclusive_sender_killed_mid_send_leaves_a_hole_that_says_so";
    match role().as_deref() {
        Some("staller") => {
            let d = child();
            let q = SlotQueue::<u64>::open(&d, "fill").unwrap();
            let mut tx = q.exclusive_sender().unwrap();
            tx.send(1).unwrap();
            assert_eq!(tx.sent_position(), 1);
            let pos = tx.__claim_and_stall();
            println!("STALLED={pos}");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("qexfill");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<u64>::create(&d, "fill", 8).unwrap();
            let mut rx = q.receiver().unwrap();
            let mut staller = spawn(TEST, "staller", &domain, &[]);
            wait_for_line(&mut staller, "STALLED=1");
            assert_eq!(q.sender().err().unwrap().kind(), ErrorKind::AlreadyExists);
            kill9(&mut staller);
            assert_eq!(rx.recv().unwrap(), 1);
            // The dead exclusive sender's claimed slot becomes a hole, as any dead sender's:
            // the receiver is told that every sender is gone instead of waiting for ever.
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap_err().kind(), ErrorKind::Disconnected);
            // Its successor adopts the entry and learns that position 1 holds no value.
            let mut tx = q.exclusive_sender().unwrap();
            assert_eq!(tx.adopted_hole(), Some(1));
            assert_eq!(tx.sent_position(), 2, "the hole counts as a position");
            tx.send(2).unwrap();
            assert_eq!(tx.adopted_hole(), None, "the first send forgets it");
            assert_eq!(tx.sent_position(), 3);
            tx.send(3).unwrap();
            assert_eq!(rx.recv().unwrap(), 2);
            assert_eq!(rx.recv().unwrap(), 3);
            drop(tx);
            assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Disconnected);
            drop(rx);
            drop(q);
            d.delete_section("fill").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_plain_sender_after_a_dead_exclusive_one_is_not_stuck_behind_its_slot() {
    const TEST: &str = "a_plain_sender_after_a_dead_exclusive_one_is_not_stuck_behind_its_slot";
    match role().as_deref() {
        Some("staller") => {
            let d = child();
            let q = SlotQueue::<u64>::open(&d, "after").unwrap();
            let mut tx = q.exclusive_sender().unwrap();
            tx.send(1).unwrap();
            let pos = tx.__claim_and_stall();
            println!("STALLED={pos}");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("qexafter");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<u64>::create(&d, "after", 4).unwrap();
            let mut staller = spawn(TEST, "staller", &domain, &[]);
            wait_for_line(&mut staller, "STALLED=1");
            kill9(&mut staller);
            // No importer comes back: a plain sender takes over the queue, more values than it
            // holds, and a receiver gets them all, in order, past the dead one's slot.
            let mut tx = q.sender().unwrap();
            let mut rx = q.receiver().unwrap();
            assert_eq!(rx.recv().unwrap(), 1);
            for v in 10..30u64 {
                tx.send_timeout(v, Duration::from_secs(10)).unwrap();
                assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), v);
            }
            drop(tx);
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap_err().kind(), ErrorKind::Disconnected);
            drop(rx);
            drop(q);
            d.delete_section("after").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
