//! Slot queues through the tunnel between two "hosts" (network namespaces with their own shm
//! directories): values cross once, in order, while both ends are killed with `kill -9`; heap
//! blocks cross as their bytes, are freed at the source once acknowledged and reallocated in
//! the far heap; each end publishes its stats, and a dead end shows as dead.

mod common;

use std::alloc::Layout;
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use common::{Hosts, Rng, kill9, role, wait_for_line};
use shmgadget::heap::{Heap, ShmBox};
use shmgadget::queue::{BlockAddr, SlotQueue};
use shmgadget::{Domain, DomainOptions, ErrorKind};
use shmgadget_tunnel::Options;
use shmgadget_tunnel::stats::{inspect, stats_name};

const DOMAIN: &str = "t18s";
const PORT: u16 = 7448;

fn opts(queue: &str, importer: bool, capacity: u64) -> Options {
    let a = std::env::var("T18_ADDR_A").unwrap();
    let b = std::env::var("T18_ADDR_B").unwrap();
    Options {
        queue: queue.into(),
        mode: Some("peer".into()),
        listen: vec![format!("tcp/{}:{PORT}", if importer { &b } else { &a })],
        connect: if importer { vec![format!("tcp/{a}:{PORT}")] } else { vec![] },
        no_scouting: true,
        capacity,
        // A line a second on stderr (shown if the test fails).
        verbose: true,
        ..Default::default()
    }
}

fn env_u64(k: &str) -> u64 {
    std::env::var(k).unwrap().parse().unwrap()
}

/// A 32-byte value: its sequence number, and a check word.
type Value = [u64; 4];

const SLOT_TEST: &str = "slot_values_cross_once_in_order_while_both_tunnel_ends_are_killed";

#[test]
fn slot_values_cross_once_in_order_while_both_tunnel_ends_are_killed() {
    if let Some(r) = role() {
        let n = env_u64("N");
        let d = Domain::attach(DOMAIN).unwrap();
        match r.as_str() {
            "producer" => {
                let q = SlotQueue::<Value>::create(&d, "ticks", 256).unwrap();
                let mut tx = q.sender().unwrap();
                println!("READY");
                for seq in 1..=n {
                    loop {
                        match tx.send_timeout([seq, !seq, 0, 0], Duration::from_secs(30)) {
                            Ok(()) => break,
                            // The exporter (the only receiver) was killed with the queue full,
                            // and its successor has not attached yet: that is `Disconnected`,
                            // as with any dead receiver. Wait for the successor.
                            Err(e) if e.kind() == ErrorKind::Disconnected => {
                                std::thread::sleep(Duration::from_millis(1))
                            }
                            Err(e) => panic!("producer: {e}"),
                        }
                    }
                }
                let _ = std::io::stdin().read(&mut [0]);
            }
            "consumer" => {
                let q = SlotQueue::<Value>::create_or_open(&d, "ticks", 256).unwrap().0;
                let mut rx = q.receiver().unwrap();
                println!("READY");
                let (mut last, mut lost, mut dup) = (0u64, 0u64, 0u64);
                let mut since = Instant::now();
                while last < n && since.elapsed() < Duration::from_secs(15) {
                    match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(v) => {
                            assert_eq!(v[1], !v[0], "value damaged");
                            if v[0] <= last {
                                dup += 1;
                            } else {
                                lost += v[0] - last - 1;
                                last = v[0];
                            }
                            since = Instant::now();
                            if last % 1000 == 0 {
                                println!("PROGRESS {last}");
                            }
                        }
                        Err(e) if matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Disconnected) => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(e) => panic!("consumer: {e}"),
                    }
                }
                let extra = rx.recv_timeout(Duration::from_millis(300)).ok();
                println!("RESULT last={last} lost={lost} dup={dup} extra={extra:?}");
            }
            "exporter" => shmgadget_tunnel::export_slots::<Value>(&d, &opts("ticks", false, 0)).unwrap(),
            "importer" => shmgadget_tunnel::import_slots::<Value>(&d, &opts("ticks", true, 256)).unwrap(),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let hosts = match Hosts::make("s") {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: cannot make two network namespaces: {why}");
            return;
        }
    };
    let n = 20_000u64;
    let env = [("N", n.to_string())];
    let mut consumer = hosts.spawn(&hosts.b, SLOT_TEST, "consumer", &env);
    let mut cout = BufReader::new(consumer.stdout.take().unwrap());
    wait_for_line(&mut cout, "READY", Duration::from_secs(20));
    let mut producer = hosts.spawn(&hosts.a, SLOT_TEST, "producer", &env);
    let mut pout = BufReader::new(producer.stdout.take().unwrap());
    wait_for_line(&mut pout, "READY", Duration::from_secs(20));
    let mut exporter = hosts.spawn(&hosts.a, SLOT_TEST, "exporter", &env);
    let mut importer = hosts.spawn(&hosts.b, SLOT_TEST, "importer", &env);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("kill seed {seed:#x}");
    let mut rng = Rng(seed);
    // Kill the importer at a third of the stream and the exporter at two thirds (plus a
    // random delay), restarting each.
    let mut result = None;
    let mut kills = 0;
    for line in cout.by_ref().lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("PROGRESS ") {
            let p: u64 = p.parse().unwrap();
            if (kills == 0 && p >= n / 3) || (kills == 1 && p >= 2 * n / 3) {
                std::thread::sleep(Duration::from_micros(rng.next() % 5_000));
                if kills == 0 {
                    kill9(&mut importer);
                    importer = hosts.spawn(&hosts.b, SLOT_TEST, "importer", &env);
                } else {
                    kill9(&mut exporter);
                    exporter = hosts.spawn(&hosts.a, SLOT_TEST, "exporter", &env);
                }
                kills += 1;
            }
        } else if line.starts_with("RESULT") {
            result = Some(line);
            break;
        }
    }
    let _ = consumer.wait();
    let expected = format!("RESULT last={n} lost=0 dup=0 extra=None");
    if result.as_deref() != Some(expected.as_str()) {
        // A stall: both queues' words while the tunnel ends still run, then their stderr.
        eprintln!("{result:?} after {kills} kills (seed {seed:#x}); the queues now:");
        for h in [&hosts.a, &hosts.b] {
            eprintln!("{}: {}", h.ns, queue_state(&h.shm, "ticks"));
        }
        hosts.dump_logs();
    }
    drop((pout, producer.stdin.take()));
    for c in [&mut producer, &mut exporter, &mut importer] {
        kill9(c);
    }
    drop(hosts);
    let result = result.expect("consumer result");
    assert_eq!(kills, 2, "{result}");
    assert_eq!(result, expected);
}

/// The words of slot queue `queue` of `Value`s in the test domain of the host whose shm
/// directory is `shm` (attached for a moment: one domain name is at one address).
fn queue_state(shm: &str, queue: &str) -> String {
    let d = match Domain::attach_with(DOMAIN, &DomainOptions { shm_dir: Some(shm.into()), ..Default::default() }) {
        Ok(d) => d,
        Err(e) => return format!("cannot attach: {e}"),
    };
    let s = match SlotQueue::<Value>::open(&d, queue) {
        Ok(q) => q.__debug_state(),
        Err(e) => format!("cannot open {queue:?}: {e}"),
    };
    let _ = d.detach();
    s
}

const BLOCK_TEST: &str = "heap_blocks_cross_as_bytes_are_freed_at_the_source_and_reallocated_far_away";
const BLOCKS: u64 = 300;

/// Block `i`'s length and content.
fn block_len(i: u64) -> usize {
    24 + (i as usize * 977) % 6000
}

fn block_byte(i: u64, j: usize) -> u8 {
    (i as usize * 31 + j * 7) as u8
}

#[test]
fn heap_blocks_cross_as_bytes_are_freed_at_the_source_and_reallocated_far_away() {
    if let Some(r) = role() {
        let d = Domain::attach(DOMAIN).unwrap();
        match r.as_str() {
            "producer" => {
                let heap = Heap::create(&d, "blobs", 64 << 20).unwrap();
                let q = SlotQueue::<BlockAddr>::create(&d, "parcels", 64).unwrap();
                let before = heap.stats().unwrap().blocks.used_blocks;
                let mut tx = q.sender().unwrap();
                for i in 1..=BLOCKS {
                    let len = block_len(i);
                    let p = heap.alloc(Layout::from_size_align(len, 16).unwrap()).unwrap();
                    // SAFETY: a fresh block of `len` bytes.
                    let b = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), len) };
                    for (j, x) in b.iter_mut().enumerate() {
                        *x = block_byte(i, j);
                    }
                    b[..8].copy_from_slice(&i.to_le_bytes());
                    // SAFETY: a live block of this heap, given up at once by `from_box`.
                    let addr = BlockAddr::from_box(unsafe { ShmBox::from_raw_in(p.as_ptr(), heap.allocator()) });
                    tx.send_timeout(addr, Duration::from_secs(30)).unwrap();
                }
                // Every block is freed here once the far side has it.
                let t = Instant::now();
                while heap.stats().unwrap().blocks.used_blocks > before && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                println!("LEFT {}", heap.stats().unwrap().blocks.used_blocks - before);
                let _ = std::io::stdin().read(&mut [0]);
            }
            "consumer" => {
                // The importer creates the far heap and queue.
                let t = Instant::now();
                let (heap, q) = loop {
                    match (Heap::open(&d, "far-blobs"), SlotQueue::<BlockAddr>::open(&d, "parcels")) {
                        (Ok(h), Ok(q)) => break (h, q),
                        _ if t.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(10)),
                        (h, q) => panic!("the importer made no heap or queue: {:?} {:?}", h.err(), q.err()),
                    }
                };
                let mut rx = q.receiver().unwrap();
                let mut bad = 0;
                for i in 1..=BLOCKS {
                    let b = rx.recv_timeout(Duration::from_secs(20)).unwrap();
                    let p = std::ptr::NonNull::new(b.addr() as *mut u8).unwrap();
                    let len = block_len(i);
                    // A live block of the far heap, of at least the block's length.
                    assert!(heap.usable_size(p).unwrap() >= len, "block {i}");
                    // SAFETY: the importer gave this block up to us; at least `len` bytes.
                    let got = unsafe { std::slice::from_raw_parts(p.as_ptr(), len) };
                    let want: Vec<u8> =
                        (0..len).map(|j| if j < 8 { i.to_le_bytes()[j] } else { block_byte(i, j) }).collect();
                    bad += (got != &want[..]) as u32;
                    // SAFETY: ours, used no more.
                    unsafe { heap.free(p).unwrap() };
                }
                println!("GOT bad={bad} left={}", heap.stats().unwrap().blocks.used_blocks);
            }
            "exporter" => shmgadget_tunnel::export_blocks(&d, "blobs", &opts("parcels", false, 0)).unwrap(),
            "importer" => {
                shmgadget_tunnel::import_blocks(&d, "far-blobs", 64 << 20, &opts("parcels", true, 64)).unwrap()
            }
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let hosts = match Hosts::make("h") {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: cannot make two network namespaces: {why}");
            return;
        }
    };
    let mut producer = hosts.spawn(&hosts.a, BLOCK_TEST, "producer", &[]);
    let mut exporter = hosts.spawn(&hosts.a, BLOCK_TEST, "exporter", &[]);
    let mut importer = hosts.spawn(&hosts.b, BLOCK_TEST, "importer", &[]);
    let mut consumer = hosts.spawn(&hosts.b, BLOCK_TEST, "consumer", &[]);
    let got = wait_for_line(&mut BufReader::new(consumer.stdout.take().unwrap()), "GOT", Duration::from_secs(60));
    let mut pout = BufReader::new(producer.stdout.take().unwrap());
    let left = wait_for_line(&mut pout, "LEFT", Duration::from_secs(30));
    assert_eq!(got, "GOT bad=0 left=0", "every block arrived whole, in the far heap");
    assert_eq!(left, "LEFT 0", "every block was freed at the source");

    // Each end's stats: running, its key, what it forwarded, nothing in flight. (One domain
    // name is at one address: attach the hosts' domains one after the other.)
    let at =
        |shm: &str| Domain::attach_with(DOMAIN, &DomainOptions { shm_dir: Some(shm.into()), ..Default::default() });
    let end = |d: &Domain, export: bool| {
        let s = d.open_section(&stats_name("parcels", export)).unwrap();
        inspect(d, &s).unwrap().expect("a stats section")
    };
    let b = at(&hosts.b.shm).unwrap();
    let i = end(&b, false);
    assert_eq!((i.end, i.pid, i.forwarded), ("import", Some(importer.id()), Some(BLOCKS)), "{i:?}");
    b.detach().unwrap();
    let a = at(&hosts.a.shm).unwrap();
    let t = Instant::now();
    let mut e = end(&a, true);
    while e.in_flight != Some(0) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        e = end(&a, true);
    }
    assert_eq!(e.pid, Some(exporter.id()));
    assert_eq!((e.end, e.key.as_str()), ("export", "shmgadget/t18s/parcels"));
    assert_eq!((e.forwarded, e.in_flight), (Some(BLOCKS), Some(0)), "{e:?}");
    kill9(&mut exporter);
    let dead = end(&a, true);
    assert_eq!((dead.pid, dead.forwarded, dead.rate, dead.in_flight), (None, None, None, None), "dead, not stale");
    assert_eq!(dead.key, "shmgadget/t18s/parcels");
    a.detach().unwrap();
    drop((pout, producer.stdin.take()));
    for c in [&mut producer, &mut importer, &mut consumer] {
        kill9(c);
    }
    drop(hosts);
}

const IDLE_TEST: &str = "an_idle_exporter_sleeps_on_its_queue";

/// CPU time (user + system) of process `pid` so far.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest.split(' ').skip(11).take(2).map(|x| x.parse().unwrap()).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

#[test]
fn an_idle_exporter_sleeps_on_its_queue() {
    if let Some(r) = role() {
        let d = Domain::attach(DOMAIN).unwrap();
        match r.as_str() {
            "producer" => {
                let q = shmgadget::queue::ByteQueue::create(&d, "quiet", 1 << 16).unwrap();
                let mut tx = q.sender().unwrap();
                for i in 0..100u64 {
                    tx.send(&i.to_le_bytes()).unwrap();
                }
                println!("SENT");
                let _ = std::io::stdin().read(&mut [0]);
            }
            "consumer" => {
                let q = shmgadget::queue::ByteQueue::create_or_open(&d, "quiet", 1 << 16).unwrap().0;
                let mut rx = q.receiver().unwrap();
                for _ in 0..100 {
                    rx.recv_timeout(Duration::from_secs(20)).unwrap();
                }
                println!("GOT");
                let _ = std::io::stdin().read(&mut [0]);
            }
            "exporter" => shmgadget_tunnel::export(&d, &opts("quiet", false, 0)).unwrap(),
            "importer" => shmgadget_tunnel::import(&d, &opts("quiet", true, 1 << 16)).unwrap(),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let hosts = match Hosts::make("i") {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: cannot make two network namespaces: {why}");
            return;
        }
    };
    let mut producer = hosts.spawn(&hosts.a, IDLE_TEST, "producer", &[]);
    let mut consumer = hosts.spawn(&hosts.b, IDLE_TEST, "consumer", &[]);
    let mut exporter = hosts.spawn(&hosts.a, IDLE_TEST, "exporter", &[]);
    let mut importer = hosts.spawn(&hosts.b, IDLE_TEST, "importer", &[]);
    let mut cout = BufReader::new(consumer.stdout.take().unwrap());
    wait_for_line(&mut cout, "GOT", Duration::from_secs(60));
    // Everything crossed; let the last acks land, then measure a second of idling.
    std::thread::sleep(Duration::from_millis(300));
    let (c0, t0) = (cpu_of(exporter.id()), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (used, wall) = (cpu_of(exporter.id()) - c0, t0.elapsed());
    println!("idle exporter: {used:?} of CPU in {wall:?}");
    for c in [&mut producer, &mut consumer, &mut exporter, &mut importer] {
        drop(c.stdin.take());
        kill9(c);
    }
    drop(hosts);
    // Clock ticks are 10 ms: a sleeping exporter (zenoh's own timers included) shows 0-20 ms;
    // one that polls its queue every millisecond shows far more.
    assert!(used <= Duration::from_millis(40), "an idle exporter used {used:?} of CPU in {wall:?}");
}

const DEAD_TEST: &str = "an_importer_killed_for_good_is_a_dead_sender_to_the_far_slot_queue";

#[test]
fn an_importer_killed_for_good_is_a_dead_sender_to_the_far_slot_queue() {
    if let Some(r) = role() {
        let d = Domain::attach(DOMAIN).unwrap();
        match r.as_str() {
            "producer" => {
                let q = SlotQueue::<Value>::create(&d, "gone", 64).unwrap();
                let mut tx = q.sender().unwrap();
                for seq in 1..=env_u64("N") {
                    if tx.send_timeout([seq, !seq, 0, 0], Duration::from_secs(30)).is_err() {
                        break;
                    }
                }
                let _ = std::io::stdin().read(&mut [0]);
            }
            "exporter" => shmgadget_tunnel::export_slots::<Value>(&d, &opts("gone", false, 0)).unwrap(),
            "importer" => shmgadget_tunnel::import_slots::<Value>(&d, &opts("gone", true, 64)).unwrap(),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let hosts = match Hosts::make("g") {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: cannot make two network namespaces: {why}");
            return;
        }
    };
    let env = [("N", 1_000_000.to_string())];
    let mut producer = hosts.spawn(&hosts.a, DEAD_TEST, "producer", &env);
    let mut exporter = hosts.spawn(&hosts.a, DEAD_TEST, "exporter", &env);
    let mut importer = hosts.spawn(&hosts.b, DEAD_TEST, "importer", &env);
    // The consumer: this process, on host B.
    let b =
        Domain::attach_with(DOMAIN, &DomainOptions { shm_dir: Some(hosts.b.shm.clone().into()), ..Default::default() })
            .unwrap();
    let t = Instant::now();
    let q = loop {
        match SlotQueue::<Value>::open(&b, "gone") {
            Ok(q) => break q,
            Err(_) if t.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the importer made no queue: {e}"),
        }
    };
    let mut rx = q.receiver().unwrap();
    let mut last = 0u64;
    fn take(
        rx: &mut shmgadget::queue::SlotReceiver<'_, Value>,
        last: &mut u64,
        timeout: Duration,
    ) -> shmgadget::Result<()> {
        let v = rx.recv_timeout(timeout)?;
        assert_eq!(v[1], !v[0], "value damaged");
        assert_eq!(v[0], *last + 1, "in order, once");
        *last = v[0];
        Ok(())
    }
    while last < 2000 {
        take(&mut rx, &mut last, Duration::from_secs(20)).unwrap();
    }
    // Killed in full flow (most likely in a send, the queue being full): it never comes back.
    kill9(&mut importer);
    let t = Instant::now();
    let err = loop {
        if let Err(e) = take(&mut rx, &mut last, Duration::from_secs(10)) {
            break e;
        }
    };
    assert_eq!(err.kind(), ErrorKind::Disconnected, "after {last} values: {err}");
    println!("the consumer got {last} values, then Disconnected after {:?}", t.elapsed());
    // A plain sender taking over is not stuck behind the dead importer's slot: more values
    // than the queue holds, each received.
    let mut tx = q.sender().unwrap();
    for seq in last + 1..last + 200 {
        tx.send_timeout([seq, !seq, 0, 0], Duration::from_secs(5)).unwrap();
        take(&mut rx, &mut last, Duration::from_secs(5)).unwrap();
    }
    drop(tx);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap_err().kind(), ErrorKind::Disconnected);
    drop(rx);
    drop(q);
    b.detach().unwrap();
    for c in [&mut producer, &mut exporter] {
        drop(c.stdin.take());
        kill9(c);
    }
    drop(hosts);
}
