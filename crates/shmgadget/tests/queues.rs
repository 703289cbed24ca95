//! Queues between real processes: exactly-once delivery, ordering, killed peers, sleeping
//! waiters, zero-copy hand-over of heap blocks.
#![cfg(unix)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use shmgadget::heap::{Heap, ShmBox};
use shmgadget::queue::{ByteQueue, SlotQueue, WaitMode};
use shmgadget::{Domain, DomainOptions, ErrorKind};

const GIB: u64 = 1 << 30;

fn child() -> Domain {
    Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap()
}

fn env_u64(name: &str) -> u64 {
    std::env::var(name).unwrap().parse().unwrap()
}

#[test]
fn four_producers_and_four_consumers_exchange_a_million_messages_exactly_once_in_order() {
    const TEST: &str = "four_producers_and_four_consumers_exchange_a_million_messages_exactly_once_in_order";
    const PER: u64 = 250_000;
    match role().as_deref() {
        Some("producer") => {
            let d = child();
            let q = SlotQueue::<[u64; 2]>::open(&d, "mpmc").unwrap();
            let me = env_u64("INDEX");
            let mut tx = q.sender().unwrap();
            println!("READY");
            for i in 0..PER {
                tx.send([me, i]).unwrap();
            }
        }
        Some("consumer") => {
            let d = child();
            let q = SlotQueue::<[u64; 2]>::open(&d, "mpmc").unwrap();
            let mut rx = q.receiver().unwrap();
            // Per producer: count, sum and sum of squares of sequence numbers; each stream must
            // arrive in increasing order at this consumer.
            let mut stats = [(0u64, 0u64, 0u128, None::<u64>); 4];
            loop {
                match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok([p, i]) => {
                        let s = &mut stats[p as usize];
                        assert!(s.3.is_none_or(|last| i > last), "producer {p}: {i} after {:?}", s.3);
                        s.0 += 1;
                        s.1 += i;
                        s.2 += (i as u128) * (i as u128);
                        s.3 = Some(i);
                    }
                    Err(e) if e.kind() == ErrorKind::Disconnected => break,
                    Err(e) => panic!("{e}"),
                }
            }
            for (p, s) in stats.iter().enumerate() {
                println!("P{p}={},{},{}", s.0, s.1, s.2);
            }
        }
        _ => {
            let domain = unique_domain("qmpmc");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<[u64; 2]>::create(&d, "mpmc", 1024).unwrap();
            let consumers: Vec<_> = (0..4).map(|_| spawn(TEST, "consumer", &domain, &[])).collect();
            // Producers attach before any of them finishes, so "every sender gone" means done.
            let mut producers: Vec<_> =
                (0..4).map(|i| spawn(TEST, "producer", &domain, &[("INDEX", i.to_string())])).collect();
            for p in &mut producers {
                wait_for_line(p, "READY");
            }
            let start = Instant::now();
            for mut p in producers {
                assert!(wait(&mut p, Duration::from_secs(240)).success());
            }
            let mut totals = [(0u64, 0u64, 0u128); 4];
            for mut c in consumers {
                let status = wait(&mut c, Duration::from_secs(240));
                let out = std::io::read_to_string(c.stdout.take().unwrap()).unwrap();
                assert!(status.success(), "{out}");
                for line in out.lines().filter(|l| l.starts_with('P')) {
                    let (p, v) = line[1..].split_once('=').unwrap();
                    let v: Vec<u128> = v.split(',').map(|x| x.parse().unwrap()).collect();
                    let t = &mut totals[p.parse::<usize>().unwrap()];
                    t.0 += v[0] as u64;
                    t.1 += v[1] as u64;
                    t.2 += v[2];
                }
            }
            eprintln!("1,000,000 messages through 4x4 processes in {:?}", start.elapsed());
            let n = PER as u128;
            for t in totals {
                assert_eq!(t.0, PER, "every message delivered once");
                assert_eq!(t.1 as u128, n * (n - 1) / 2);
                assert_eq!(t.2, (n - 1) * n * (2 * n - 1) / 6);
            }
            let info = shmgadget::queue::inspect(q.section().unwrap()).unwrap();
            assert_eq!((info.sent, info.received, info.fill), (4 * PER, 4 * PER, 0));
            drop(q);
            d.delete_section("mpmc").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_producer_killed_mid_stream_loses_nothing_it_sent_and_the_consumer_is_told() {
    const TEST: &str = "a_producer_killed_mid_stream_loses_nothing_it_sent_and_the_consumer_is_told";
    match role().as_deref() {
        Some("producer") => {
            let d = child();
            let q = ByteQueue::open(&d, "bytes").unwrap();
            let mut tx = q.sender().unwrap();
            println!("READY");
            for i in 0u64.. {
                // Variable sizes, each message filled with its own number.
                let len = 8 + (i % 300) as usize;
                let mut msg = vec![(i % 251) as u8; len];
                msg[..8].copy_from_slice(&i.to_le_bytes());
                tx.send(&msg).unwrap();
            }
        }
        _ => {
            let domain = unique_domain("qkill");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = ByteQueue::create(&d, "bytes", 64 << 10).unwrap();
            let mut rx = q.receiver().unwrap();
            let mut producer = spawn(TEST, "producer", &domain, &[]);
            wait_for_line(&mut producer, "READY");
            let mut next = 0u64;
            let check = |m: &[u8], next: &mut u64| {
                let i = u64::from_le_bytes(m[..8].try_into().unwrap());
                assert_eq!(i, *next, "messages arrive in order, none missing");
                assert_eq!(m.len(), 8 + (i % 300) as usize);
                assert!(m[8..].iter().all(|&b| b == (i % 251) as u8), "message {i} is whole");
                *next += 1;
            };
            while next < 20_000 {
                let m = rx.recv_timeout(Duration::from_secs(30)).unwrap();
                check(&m, &mut next);
            }
            kill9(&mut producer);
            let t = Instant::now();
            let err = loop {
                match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(m) => check(&m, &mut next),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
            assert!(t.elapsed() < Duration::from_secs(10), "noticed in {:?}", t.elapsed());
            eprintln!("received {next} messages; then: {err}");
            drop(rx);
            drop(q);
            d.delete_section("bytes").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_dead_consumer_does_not_block_a_producer_and_its_place_is_taken_over() {
    const TEST: &str = "a_dead_consumer_does_not_block_a_producer_and_its_place_is_taken_over";
    match role().as_deref() {
        Some("consumer") => {
            let d = child();
            let q = ByteQueue::open(&d, "full").unwrap();
            let _rx = q.receiver().unwrap();
            println!("READY");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("qdeadrx");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = ByteQueue::create(&d, "full", 4096).unwrap();
            let mut consumer = spawn(TEST, "consumer", &domain, &[]);
            wait_for_line(&mut consumer, "READY");
            let mut tx = q.sender().unwrap();
            // Fill the ring: the consumer never reads.
            while tx.try_send(&[1; 100]).is_ok() {}
            assert_eq!(tx.try_send(&[1; 100]).unwrap_err().kind(), ErrorKind::WouldBlock);
            assert_eq!(tx.send_timeout(&[1; 100], Duration::from_millis(100)).unwrap_err().kind(), ErrorKind::Timeout);
            assert_eq!(q.receiver().err().map(|e| e.kind()), Some(ErrorKind::AlreadyExists), "one live receiver");
            kill9(&mut consumer);
            let t = Instant::now();
            assert_eq!(tx.send(&[1; 100]).unwrap_err().kind(), ErrorKind::Disconnected);
            assert!(t.elapsed() < Duration::from_secs(10));
            // A new receiver takes the dead one's place and finds every message.
            let mut rx = q.receiver().unwrap();
            let mut n = 0;
            while rx.try_recv().is_ok() {
                n += 1;
            }
            assert!(n > 30, "{n}");
            drop((tx, rx));
            drop(q);
            d.delete_section("full").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_blocked_receiver_sleeps_without_burning_cpu_and_wakes_on_send() {
    const TEST: &str = "a_blocked_receiver_sleeps_without_burning_cpu_and_wakes_on_send";
    match role().as_deref() {
        Some("receiver") => {
            let d = child();
            let q = SlotQueue::<u64>::open(&d, "idle").unwrap();
            let mut rx = q.receiver_with(WaitMode::Blocking).unwrap();
            let (cpu0, t0) = (cpu_time(), Instant::now());
            let v = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            println!("VALUE={v}");
            println!("BLOCKED_MS={}", t0.elapsed().as_millis());
            println!("CPU_MS={}", (cpu_time() - cpu0).as_millis());
        }
        _ => {
            let domain = unique_domain("qidle");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<u64>::create(&d, "idle", 16).unwrap();
            let mut tx = q.sender().unwrap();
            let child = {
                let domain = domain.clone();
                std::thread::spawn(move || run(TEST, "receiver", &domain, &[]))
            };
            std::thread::sleep(Duration::from_millis(1000));
            tx.send(42).unwrap();
            let r = child.join().unwrap();
            assert_eq!(r["VALUE"], "42");
            let blocked: u64 = r["BLOCKED_MS"].parse().unwrap();
            let cpu: u64 = r["CPU_MS"].parse().unwrap();
            assert!(blocked >= 300, "the receiver should have waited: {blocked} ms");
            assert!(cpu * 10 < blocked, "a receiver blocked for {blocked} ms used {cpu} ms of CPU");
            drop(tx);
            drop(q);
            d.delete_section("idle").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

/// The round-trip pattern of the latency benchmark, then pauses: the echo side, blocked in
/// the default mode while its peer pauses 100 ms between messages, must sleep (under a tenth
/// of the pauses in CPU) whatever its spin policy, although it was answering round trips
/// back to back just before.
#[test]
fn a_byte_queue_echo_whose_peer_pauses_100_ms_sleeps_between_round_trips() {
    const TEST: &str = "a_byte_queue_echo_whose_peer_pauses_100_ms_sleeps_between_round_trips";
    const FAST: u32 = 20_000;
    const PAUSES: u32 = 5;
    match role().as_deref() {
        Some("echo") => {
            let d = child();
            let (ping, pong) = (ByteQueue::open(&d, "ping").unwrap(), ByteQueue::open(&d, "pong").unwrap());
            let mut rx = ping.receiver().unwrap();
            let mut tx = pong.sender().unwrap();
            for _ in 0..FAST {
                let m = rx.recv().unwrap().to_vec();
                tx.send(&m).unwrap();
            }
            // The paused phase: CPU time of this process from here to the end.
            let (cpu0, t0) = (cpu_time(), Instant::now());
            for _ in 0..PAUSES {
                let m = rx.recv().unwrap().to_vec();
                tx.send(&m).unwrap();
            }
            println!("PAUSED_MS={}", t0.elapsed().as_millis());
            println!("CPU_US={}", (cpu_time() - cpu0).as_micros());
        }
        _ => {
            let domain = unique_domain("qpause");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let ping = ByteQueue::create(&d, "ping", 64 << 10).unwrap();
            let pong = ByteQueue::create(&d, "pong", 64 << 10).unwrap();
            let mut tx = ping.sender().unwrap();
            let mut rx = pong.receiver().unwrap();
            let child = {
                let domain = domain.clone();
                std::thread::spawn(move || run(TEST, "echo", &domain, &[]))
            };
            for i in 0..FAST + PAUSES {
                if i >= FAST {
                    std::thread::sleep(Duration::from_millis(100));
                }
                tx.send(&i.to_le_bytes()).unwrap();
                assert_eq!(&*rx.recv().unwrap(), &i.to_le_bytes());
            }
            let r = child.join().unwrap();
            let paused: u64 = r["PAUSED_MS"].parse().unwrap();
            let cpu_us: u64 = r["CPU_US"].parse().unwrap();
            eprintln!("echo: paused {paused} ms, cpu {cpu_us} us");
            assert!(paused >= 400, "the echo should have waited through the pauses: {paused} ms");
            assert!(cpu_us / 100 < paused, "an echo blocked for {paused} ms used {cpu_us} µs of CPU");
            drop((tx, rx));
            drop((ping, pong));
            d.delete_section("ping").unwrap();
            d.delete_section("pong").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe_zeroed();
    // SAFETY: getrusage writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn unsafe_zeroed() -> libc::rusage {
    // SAFETY: rusage is plain integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

#[test]
fn a_heap_block_is_handed_over_through_a_queue_without_copying() {
    const TEST: &str = "a_heap_block_is_handed_over_through_a_queue_without_copying";
    const LEN: usize = 8 << 20;
    match role().as_deref() {
        Some("receiver") => {
            let d = child();
            let heap = Heap::open(&d, "blocks").unwrap();
            let q = SlotQueue::<shmgadget::queue::BlockAddr>::open(&d, "handover").unwrap();
            let mut rx = q.receiver().unwrap();
            let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            // SAFETY: the sender gave up the box when it sent its address; we own it now.
            let b: ShmBox<[u8; LEN]> = unsafe { addr.into_box(heap.allocator()) };
            println!("ADDR={:p}", &*b);
            println!("SUM={}", b.iter().map(|&x| x as u64).sum::<u64>());
            drop(b);
        }
        _ => {
            let domain = unique_domain("qzero");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "blocks", 64 << 20).unwrap();
            let q = SlotQueue::<shmgadget::queue::BlockAddr>::create(&d, "handover", 4).unwrap();
            let mut tx = q.sender().unwrap();
            let mut b: ShmBox<[u8; LEN]> =
                unsafe_assume_init(ShmBox::<[u8; LEN]>::try_new_zeroed_in(heap.allocator()).unwrap());
            b[..1000].fill(3);
            let addr_here = format!("{:p}", &*b);
            tx.send(shmgadget::queue::BlockAddr::from_box(b)).unwrap();
            let r = run(TEST, "receiver", &domain, &[]);
            assert_eq!(r["ADDR"], addr_here, "the receiver sees the very same block");
            assert_eq!(r["SUM"], "3000");
            let s = heap.stats().unwrap();
            assert_eq!(s.blocks.used_blocks, 0, "the receiver freed it: {s:?}");
            drop(tx);
            drop((q, heap));
            d.delete_section("handover").unwrap();
            d.delete_section("blocks").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

fn unsafe_assume_init<T>(b: ShmBox<std::mem::MaybeUninit<T>>) -> ShmBox<T> {
    // SAFETY: called on a zeroed box of a byte array, for which all-zero is a valid value.
    unsafe { b.assume_init() }
}

#[test]
fn a_sender_killed_between_claiming_a_slot_and_filling_it_leaves_a_hole_that_is_skipped() {
    const TEST: &str = "a_sender_killed_between_claiming_a_slot_and_filling_it_leaves_a_hole_that_is_skipped";
    match role().as_deref() {
        Some("staller") => {
            let d = child();
            let q = SlotQueue::<u64>::open(&d, "holes").unwrap();
            let mut tx = q.sender().unwrap();
            tx.send(1).unwrap();
            let pos = tx.__claim_and_stall();
            println!("STALLED={pos}");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("qhole");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<u64>::create(&d, "holes", 8).unwrap();
            let mut rx = q.receiver().unwrap();
            let mut staller = spawn(TEST, "staller", &domain, &[]);
            wait_for_line(&mut staller, "STALLED=1");
            let mut tx = q.sender().unwrap();
            tx.send(2).unwrap();
            tx.send(3).unwrap();
            assert_eq!(rx.recv().unwrap(), 1);
            // Position 1 is claimed by a live process: nothing to receive yet.
            assert_eq!(rx.recv_timeout(Duration::from_millis(200)).unwrap_err().kind(), ErrorKind::Timeout);
            kill9(&mut staller);
            let t = Instant::now();
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 2, "the dead sender's slot is skipped");
            assert_eq!(rx.recv().unwrap(), 3);
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
            drop(tx);
            assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Disconnected);
            drop(rx);
            drop(q);
            d.delete_section("holes").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_receiver_killed_holding_a_claimed_slot_is_settled_when_its_successor_takes_its_place() {
    const TEST: &str = "a_receiver_killed_holding_a_claimed_slot_is_settled_when_its_successor_takes_its_place";
    match role().as_deref() {
        Some("staller") => {
            let d = child();
            let q = SlotQueue::<u64>::open(&d, "claims").unwrap();
            let mut rx = q.receiver().unwrap();
            assert_eq!(rx.recv().unwrap(), 0);
            let pos = rx.__claim_and_stall();
            println!("STALLED={pos}");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("qclaim");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<u64>::create(&d, "claims", 4).unwrap();
            let mut tx = q.sender().unwrap();
            tx.send(0).unwrap();
            tx.send(1).unwrap();
            let mut staller = spawn(TEST, "staller", &domain, &[]);
            wait_for_line(&mut staller, "STALLED=1");
            kill9(&mut staller);
            // The successor takes the dead receiver's place in the peer table. Before, that
            // erased the record of its claim on position 1, and the slot stayed full for ever:
            // the fourth send below (position 5, the same slot) never got its space.
            let mut rx = q.receiver().unwrap();
            for v in 2..6 {
                tx.send_timeout(v, Duration::from_secs(10)).unwrap_or_else(|e| panic!("send {v}: {e}"));
            }
            for v in 2..6 {
                assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), v, "value 1 died with its receiver");
            }
            drop(tx);
            assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Disconnected);
            drop(rx);
            drop(q);
            d.delete_section("claims").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_slow_reader_killed_25_times_hands_its_successor_nothing_it_had_returned_and_nothing_is_lost() {
    const TEST: &str = "a_slow_reader_killed_25_times_hands_its_successor_nothing_it_had_returned_and_nothing_is_lost";
    const KILLS: usize = 25;
    const TOTAL: u64 = 20_000;
    match role().as_deref() {
        Some("sender") => {
            let d = child();
            let q = ByteQueue::open(&d, "takeover").unwrap();
            let mut tx = q.sender().unwrap();
            println!("READY");
            for id in 0..TOTAL {
                let mut msg = [0u8; 16];
                msg[..8].copy_from_slice(&id.to_le_bytes());
                msg[8..].copy_from_slice(&(!id).to_le_bytes());
                // Between a reader's death and its successor's arrival there is no receiver:
                // the send fails without writing anything, and is retried.
                let t = Instant::now();
                loop {
                    match tx.send_timeout(&msg, Duration::from_secs(30)) {
                        Ok(()) => break,
                        Err(e) if e.kind() == ErrorKind::Disconnected && t.elapsed() < Duration::from_secs(30) => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Err(e) => panic!("message {id}: {e}"),
                    }
                }
            }
        }
        Some("reader") => {
            use std::io::Write;
            // Its own file (the test harness writes to stdout too), appended to with one
            // write(2) of 8 bytes per id: all or nothing, even under kill -9.
            let mut out = std::fs::OpenOptions::new().append(true).open(std::env::var("IDS").unwrap()).unwrap();
            let slow = std::env::var("SLOW").is_ok();
            let d = child();
            let q = ByteQueue::open(&d, "takeover").unwrap();
            let mut rx = q.receiver().unwrap();
            loop {
                let m = match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::Disconnected => break,
                    Err(e) => panic!("{e}"),
                };
                let id = u64::from_le_bytes(m[..8].try_into().unwrap());
                assert_eq!(u64::from_le_bytes(m[8..].try_into().unwrap()), !id, "message {id} is whole");
                // Report while the message is still in hand, then work on it a little, then
                // return it to the ring: a reader killed in between had it in hand, and its
                // successor may see it again.
                out.write_all(&id.to_le_bytes()).unwrap();
                if slow {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(20) {
                        std::hint::spin_loop();
                    }
                }
                drop(m);
            }
        }
        _ => {
            let domain = unique_domain("qtakeover");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            // 24-byte records: a 64 KiB ring holds 2,730 messages, a quarter ring 682.
            let q = ByteQueue::create(&d, "takeover", 64 << 10).unwrap();
            let mut sender = spawn(TEST, "sender", &domain, &[]);
            wait_for_line(&mut sender, "READY");
            // Every reader's ids, in the order it reported them.
            let mut streams: Vec<Vec<u64>> = Vec::new();
            for k in 0..=KILLS {
                let last = k == KILLS;
                let ids_file = std::env::temp_dir().join(format!("{domain}-reader-{k}.ids"));
                std::fs::write(&ids_file, b"").unwrap();
                let mut env = vec![("IDS", ids_file.to_str().unwrap().to_owned())];
                if !last {
                    env.push(("SLOW", "1".into()));
                }
                let mut reader = spawn(TEST, "reader", &domain, &env);
                if last {
                    assert!(wait(&mut reader, Duration::from_secs(120)).success(), "the last reader failed");
                } else {
                    // Kill it after a varying number of messages, with the ring full behind it.
                    let kill_after = 150 + (k * 97) % 400;
                    let t = Instant::now();
                    while std::fs::metadata(&ids_file).unwrap().len() < 8 * kill_after as u64 {
                        assert!(t.elapsed() < Duration::from_secs(30), "reader {k} stopped reporting");
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    kill9(&mut reader);
                }
                let bytes = std::fs::read(&ids_file).unwrap();
                std::fs::remove_file(&ids_file).unwrap();
                streams.push(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect());
            }
            assert!(wait(&mut sender, Duration::from_secs(60)).success(), "the sender failed");
            // Each reader sees consecutive ids. Its successor starts right after the last id
            // it reported, or at that id again (the message it had in hand when killed).
            let mut next = 0u64;
            let (mut in_hand, mut dups, mut lost) = (0, 0u64, 0u64);
            for (k, s) in streams.iter().enumerate() {
                assert!(!s.is_empty(), "reader {k} received nothing");
                for w in s.windows(2) {
                    assert_eq!(w[1], w[0] + 1, "reader {k}: ids in order, none skipped");
                }
                match s[0] {
                    first if first + 1 == next => in_hand += 1,
                    first if first < next => dups += next - first,
                    first => lost += first - next,
                }
                next = *s.last().unwrap() + 1;
            }
            eprintln!(
                "{KILLS} readers killed: {in_hand} in-hand messages redelivered to their successors, \
                 {dups} other duplicates, {lost} lost"
            );
            assert_eq!((dups, lost), (0, 0), "no message returned by a read is delivered again, none is lost");
            assert_eq!(next, TOTAL, "every message arrived");
            // The count survives the takeovers too: each message counted once, when consumed.
            let info = shmgadget::queue::inspect(q.section().unwrap()).unwrap();
            assert_eq!((info.sent, info.received, info.fill), (TOTAL, TOTAL, 0));
            drop(q);
            d.delete_section("takeover").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_slot_queue_reader_killed_10_times_never_hands_a_value_twice_and_loses_at_most_the_one_it_held() {
    const TEST: &str =
        "a_slot_queue_reader_killed_10_times_never_hands_a_value_twice_and_loses_at_most_the_one_it_held";
    const KILLS: usize = 10;
    const TOTAL: u64 = 10_000;
    match role().as_deref() {
        Some("sender") => {
            let d = child();
            let q = SlotQueue::<[u64; 2]>::open(&d, "slots").unwrap();
            let mut tx = q.sender().unwrap();
            println!("READY");
            for id in 0..TOTAL {
                let t = Instant::now();
                loop {
                    match tx.send_timeout([id, !id], Duration::from_secs(30)) {
                        Ok(()) => break,
                        // No receiver between a death and the next attach: retried.
                        Err(e) if e.kind() == ErrorKind::Disconnected && t.elapsed() < Duration::from_secs(30) => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Err(e) => panic!("value {id}: {e}"),
                    }
                }
            }
        }
        Some("reader") => {
            use std::io::Write;
            // One write(2) of 8 bytes per id to its own file: all or nothing under kill -9.
            let mut out = std::fs::OpenOptions::new().append(true).open(std::env::var("IDS").unwrap()).unwrap();
            let slow = std::env::var("SLOW").is_ok();
            let d = child();
            let q = SlotQueue::<[u64; 2]>::open(&d, "slots").unwrap();
            let mut rx = q.receiver().unwrap();
            loop {
                let [id, check] = match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(v) => v,
                    Err(e) if e.kind() == ErrorKind::Disconnected => break,
                    Err(e) => panic!("{e}"),
                };
                assert_eq!(check, !id, "value {id} is whole");
                out.write_all(&id.to_le_bytes()).unwrap();
                if slow {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(20) {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        _ => {
            let domain = unique_domain("qslottakeover");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let q = SlotQueue::<[u64; 2]>::create(&d, "slots", 1024).unwrap();
            let mut sender = spawn(TEST, "sender", &domain, &[]);
            wait_for_line(&mut sender, "READY");
            let mut ids = Vec::new();
            for k in 0..=KILLS {
                let last = k == KILLS;
                let ids_file = std::env::temp_dir().join(format!("{domain}-reader-{k}.ids"));
                std::fs::write(&ids_file, b"").unwrap();
                let mut env = vec![("IDS", ids_file.to_str().unwrap().to_owned())];
                if !last {
                    env.push(("SLOW", "1".into()));
                }
                let mut reader = spawn(TEST, "reader", &domain, &env);
                if last {
                    assert!(wait(&mut reader, Duration::from_secs(120)).success(), "the last reader failed");
                } else {
                    let kill_after = 150 + (k * 97) % 400;
                    let t = Instant::now();
                    while std::fs::metadata(&ids_file).unwrap().len() < 8 * kill_after as u64 {
                        assert!(t.elapsed() < Duration::from_secs(30), "reader {k} stopped reporting");
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    kill9(&mut reader);
                }
                let bytes = std::fs::read(&ids_file).unwrap();
                std::fs::remove_file(&ids_file).unwrap();
                ids.extend(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())));
            }
            assert!(wait(&mut sender, Duration::from_secs(60)).success(), "the sender failed");
            let mut seen = vec![0u32; TOTAL as usize];
            for &id in &ids {
                seen[id as usize] += 1;
            }
            let twice = seen.iter().filter(|&&n| n > 1).count();
            let lost = seen.iter().filter(|&&n| n == 0).count();
            eprintln!(
                "{KILLS} slot-queue readers killed: {twice} values delivered twice, {lost} lost (held when killed)"
            );
            assert_eq!(twice, 0, "a value returned by a receive is never delivered again");
            assert!(lost <= KILLS, "at most the value each killed reader held is lost: {lost}");
            drop(q);
            d.delete_section("slots").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

/// The message `id` of the lanes test: its number, its complement, then filler, 16 to 2,015
/// bytes long.
fn lane_message(id: u64) -> Vec<u8> {
    let mut m = vec![(id % 251) as u8; 16 + (id * 37 % 2000) as usize];
    m[..8].copy_from_slice(&id.to_le_bytes());
    m[8..16].copy_from_slice(&(!id).to_le_bytes());
    m
}

#[test]
fn a_large_ring_with_its_hot_lane_survives_senders_and_receivers_killed_mid_stream() {
    const TEST: &str = "a_large_ring_with_its_hot_lane_survives_senders_and_receivers_killed_mid_stream";
    const KILLS: u64 = 8;
    const TOTAL: u64 = 40_000;
    let read_ids = |path: &str| -> Vec<u64> {
        let bytes = std::fs::read(path).unwrap_or_default();
        bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    match role().as_deref() {
        Some("sender") => {
            use std::io::Write;
            // Like the tunnel importer: after each message, one write(2) of (id, position)
            // appended to a file shared by all senders; a successor whose queue position
            // differs from the last record knows the message after it went in.
            let path = std::env::var("SENT").unwrap();
            let d = child();
            let q = ByteQueue::open(&d, "lanes").unwrap();
            let mut tx = q.sender().unwrap();
            let rec = read_ids(&path);
            let mut next = match rec.len() {
                0 => u64::from(tx.position() != 0),
                n => rec[n - 2] + if tx.position() == rec[n - 1] { 1 } else { 2 },
            };
            let mut out = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
            while next < TOTAL {
                let t = Instant::now();
                loop {
                    match tx.send_timeout(&lane_message(next), Duration::from_secs(30)) {
                        Ok(()) => break,
                        // No receiver between a death and its successor: retried.
                        Err(e) if e.kind() == ErrorKind::Disconnected && t.elapsed() < Duration::from_secs(30) => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Err(e) => panic!("message {next}: {e}"),
                    }
                }
                let mut r = [0u8; 16];
                r[..8].copy_from_slice(&next.to_le_bytes());
                r[8..].copy_from_slice(&tx.position().to_le_bytes());
                out.write_all(&r).unwrap();
                next += 1;
            }
        }
        Some("reader") => {
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new().append(true).open(std::env::var("IDS").unwrap()).unwrap();
            let done = std::env::var("DONE").unwrap();
            let d = child();
            let q = ByteQueue::open(&d, "lanes").unwrap();
            let mut rx = q.receiver().unwrap();
            let mut got = 0u64;
            loop {
                let m = match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(m) => m,
                    // The sender died (a successor comes) or finished (the parent says so).
                    Err(e) if e.kind() == ErrorKind::Disconnected => {
                        if std::path::Path::new(&done).exists() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                let id = u64::from_le_bytes(m[..8].try_into().unwrap());
                assert_eq!(&*m, &lane_message(id)[..], "message {id} is whole");
                // Reported while in hand (see the byte-queue takeover test above).
                out.write_all(&id.to_le_bytes()).unwrap();
                drop(m);
                got += 1;
                // Stall now and then, so the sender overflows the hot lane into the main lane
                // and comes back.
                if got % 3000 == 0 {
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        }
        _ => {
            let domain = unique_domain("qlanes");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            // A 4 MiB ring: a 2 MiB hot lane on top.
            let q = ByteQueue::create(&d, "lanes", 4 << 20).unwrap();
            let tmp = |what: &str| std::env::temp_dir().join(format!("{domain}-{what}")).to_str().unwrap().to_owned();
            let (sent, done) = (tmp("sent"), tmp("done"));
            std::fs::write(&sent, b"").unwrap();
            let reader_env = |k: u64| {
                let ids = tmp(&format!("reader-{k}"));
                std::fs::write(&ids, b"").unwrap();
                (ids.clone(), vec![("IDS", ids), ("DONE", done.clone())])
            };
            let mut sender = spawn(TEST, "sender", &domain, &[("SENT", sent.clone())]);
            let (mut ids, env) = reader_env(0);
            let mut reader = spawn(TEST, "reader", &domain, &env);
            let mut files = vec![ids.clone()];
            let received =
                |files: &[String]| files.iter().map(|f| std::fs::metadata(f).unwrap().len() / 8).sum::<u64>();
            for k in 0..KILLS {
                // Kill the sender or a reader in turn, every few thousand messages.
                let at = (k + 1) * TOTAL / (KILLS + 2) + k * 97;
                let t = Instant::now();
                while received(&files) < at {
                    assert!(t.elapsed() < Duration::from_secs(60), "stuck at {} messages", received(&files));
                    std::thread::sleep(Duration::from_micros(300));
                }
                if k % 2 == 0 {
                    kill9(&mut sender);
                    sender = spawn(TEST, "sender", &domain, &[("SENT", sent.clone())]);
                } else {
                    kill9(&mut reader);
                    let env;
                    (ids, env) = reader_env(k);
                    files.push(ids.clone());
                    reader = spawn(TEST, "reader", &domain, &env);
                }
            }
            assert!(wait(&mut sender, Duration::from_secs(120)).success(), "the last sender failed");
            std::fs::write(&done, b"").unwrap();
            assert!(wait(&mut reader, Duration::from_secs(60)).success(), "the last reader failed");
            // Each reader's ids are consecutive; a successor starts right after its
            // predecessor's last report, or at it again (the message in hand when killed).
            let mut next = 0u64;
            let mut in_hand = 0;
            for (k, f) in files.iter().enumerate() {
                let s = read_ids(f);
                std::fs::remove_file(f).unwrap();
                assert!(!s.is_empty(), "reader {k} received nothing");
                for w in s.windows(2) {
                    assert_eq!(w[1], w[0] + 1, "reader {k}: ids in order, none lost or repeated");
                }
                if s[0] + 1 == next {
                    in_hand += 1;
                } else {
                    assert_eq!(s[0], next, "reader {k} starts where its predecessor stopped");
                }
                next = *s.last().unwrap() + 1;
            }
            eprintln!("{} senders and {} readers killed: {in_hand} in-hand messages redelivered", KILLS / 2, KILLS / 2);
            assert_eq!(next, TOTAL, "every message arrived");
            std::fs::remove_file(&sent).unwrap();
            std::fs::remove_file(&done).unwrap();
            let info = shmgadget::queue::inspect(q.section().unwrap()).unwrap();
            assert_eq!((info.sent, info.received, info.fill), (TOTAL, TOTAL, 0));
            // The stalls made the sender use the main lane: its position (bits 23.. of the
            // packed send position at offset 128 of the header) moved.
            // SAFETY: an 8-aligned word inside the mapped header, read atomically.
            let w = unsafe {
                (*q.section().unwrap().as_ptr().add(128).cast::<std::sync::atomic::AtomicU64>())
                    .load(std::sync::atomic::Ordering::Acquire)
            };
            assert!(w >> 23 > 0, "the main lane was never used: {w:#x}");
            drop(q);
            d.delete_section("lanes").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

/// A sender numbers its messages `sent() + 1`; a reader checks each against `consumed() + 1`.
/// Both are killed at random moments of a tight loop, 60 times, in a ring of one lane and in
/// one with a hot lane: each successor must resume both counts exactly where the queue's
/// published and consumed messages stand, whatever instruction its predecessor died at.
#[test]
fn counts_resume_exactly_when_senders_and_receivers_are_killed_at_random_instructions() {
    const TEST: &str = "counts_resume_exactly_when_senders_and_receivers_are_killed_at_random_instructions";
    const KILLS: u64 = 60;
    let retry = |e: shmgadget::Error, t: Instant| {
        // No peer between a death and its successor: retried.
        assert!(e.kind() == ErrorKind::Disconnected && t.elapsed() < Duration::from_secs(30), "{e}");
        std::thread::sleep(Duration::from_micros(200));
    };
    match role().as_deref() {
        Some("sender") => {
            let d = child();
            let q = ByteQueue::open(&d, "counts").unwrap();
            let mut tx = q.sender().unwrap();
            // Some senders batch: the count then moves once per publication.
            tx.set_batch(env_u64("BATCH"));
            println!("READY");
            let mut t = Instant::now();
            loop {
                let id = tx.sent() + 1;
                let len = 8 + (id % 5) as usize * 8;
                let mut m = [0u8; 48];
                m[..8].copy_from_slice(&id.to_le_bytes());
                match tx.send_timeout(&m[..len], Duration::from_secs(30)) {
                    Ok(()) => t = Instant::now(),
                    Err(e) => retry(e, t),
                }
            }
        }
        Some("reader") => {
            let d = child();
            let q = ByteQueue::open(&d, "counts").unwrap();
            let mut rx = q.receiver().unwrap();
            println!("READY");
            let mut t = Instant::now();
            loop {
                let before = rx.consumed();
                match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(m) => {
                        let id = u64::from_le_bytes(m[..8].try_into().unwrap());
                        assert_eq!(id, before + 1, "the message after {before} consumed");
                        t = Instant::now();
                    }
                    Err(e) => retry(e, t),
                }
            }
        }
        _ => {
            for (ring, what) in [(64 << 10, "one lane"), (4 << 20, "a hot lane")] {
                let domain = unique_domain("qcounts");
                let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
                let q = ByteQueue::create(&d, "counts", ring).unwrap();
                let start = |role: &str, k: u64| {
                    let mut c = spawn(TEST, role, &domain, &[("BATCH", (k % 3 * 200).to_string())]);
                    wait_for_line(&mut c, "READY");
                    c
                };
                let mut sender = start("sender", 0);
                let mut reader = start("reader", 0);
                // A cheap generator of pauses from 0.5 to 8 ms, so kills land anywhere.
                let mut seed = u64::from(std::process::id()) | 1;
                for k in 0..KILLS {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    std::thread::sleep(Duration::from_micros(500 + seed % 7500));
                    if seed >> 40 & 1 == 0 {
                        kill9(&mut sender);
                        sender = start("sender", k);
                    } else {
                        kill9(&mut reader);
                        reader = start("reader", k);
                    }
                }
                kill9(&mut sender);
                kill9(&mut reader);
                // What the last ones left: the published messages, numbered on from what was
                // consumed, and a count of them a new sender continues.
                let mut rx = q.receiver().unwrap();
                let tx = q.sender().unwrap();
                let sent = tx.sent();
                loop {
                    let before = rx.consumed();
                    let Ok(m) = rx.try_recv() else { break };
                    assert_eq!(u64::from_le_bytes(m[..8].try_into().unwrap()), before + 1, "{what}: drained in order");
                }
                assert_eq!(rx.consumed(), sent, "{what}: every published message counted once on each side");
                assert!(sent > 1000, "{what}: only {sent} messages in {KILLS} lives");
                let info = shmgadget::queue::inspect(q.section().unwrap()).unwrap();
                assert_eq!((info.sent, info.received, info.fill), (sent, sent, 0), "{what}");
                eprintln!("{what}: {sent} messages through {KILLS} deaths");
                drop((tx, rx));
                drop(q);
                d.delete_section("counts").unwrap();
                d.detach().unwrap();
                assert_clean(&domain);
            }
        }
    }
}
