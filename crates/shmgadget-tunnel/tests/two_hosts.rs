//! The tunnel between two "hosts" (network namespaces with their own shm directories):
//! every message arrives, in order, once, while both tunnel ends are killed with `kill -9`
//! at random moments and restarted.
//!
//! `T18_MESSAGES` (default 100,000) and `T18_KILLS` (kills of each end, default 2) scale it;
//! the full run is `T18_MESSAGES=1000000 T18_KILLS=3`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Hosts, Rng, kill9, role, wait_for_line};
use shmgadget::queue::ByteQueue;
use shmgadget::{Domain, ErrorKind};
use shmgadget_tunnel::Options;

const TEST: &str = "every_message_crosses_once_in_order_while_both_tunnel_ends_are_killed";
const DOMAIN: &str = "t18";
const QUEUE: &str = "orders";
const PORT: u16 = 7447;

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn tunnel_opts(importer: bool) -> Options {
    let a = std::env::var("T18_ADDR_A").unwrap();
    let b = std::env::var("T18_ADDR_B").unwrap();
    Options {
        queue: QUEUE.into(),
        mode: Some("peer".into()),
        listen: vec![format!("tcp/{}:{PORT}", if importer { &b } else { &a })],
        connect: if importer { vec![format!("tcp/{a}:{PORT}")] } else { vec![] },
        no_scouting: true,
        capacity: 1 << 20,
        ..Default::default()
    }
}

fn child(role: &str) {
    let n = env_u64("T18_MESSAGES", 100_000);
    let d = Domain::attach(DOMAIN).unwrap();
    match role {
        "producer" => {
            let q = ByteQueue::create(&d, QUEUE, 1 << 20).unwrap();
            let mut tx = q.sender().unwrap();
            println!("READY");
            let mut msg = [0x5au8; 64];
            for seq in 1..=n {
                msg[..8].copy_from_slice(&seq.to_le_bytes());
                loop {
                    match tx.send_timeout(&msg, Duration::from_secs(30)) {
                        Ok(()) => break,
                        // The exporter died with the ring full: wait for its successor.
                        Err(e) if e.kind() == ErrorKind::Disconnected => std::thread::sleep(Duration::from_millis(1)),
                        Err(e) => panic!("producer: {e}"),
                    }
                }
            }
            println!("SENT {n}");
            // Stay (the sender of the queue) until told to go.
            let _ = std::io::stdin().read(&mut [0]);
        }
        "consumer" => {
            let (q, _) = ByteQueue::create_or_open(&d, QUEUE, 1 << 20).unwrap();
            let mut rx = q.receiver().unwrap();
            println!("READY");
            let (mut last, mut lost, mut dup, mut disconnects) = (0u64, 0u64, 0u64, 0u64);
            let mut max_wait = Duration::ZERO;
            let mut since = Instant::now();
            // A restart takes well under a second: 15 s without a message is a stuck tunnel
            // (a lost message: the importer never writes past a gap).
            while last < n && since.elapsed() < Duration::from_secs(15) {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(m) => {
                        assert_eq!(m.len(), 64, "message size");
                        let seq = u64::from_le_bytes(m[..8].try_into().unwrap());
                        if seq <= last {
                            dup += 1;
                        } else {
                            lost += seq - last - 1;
                            last = seq;
                        }
                        max_wait = max_wait.max(since.elapsed());
                        since = Instant::now();
                        if seq % 10_000 == 0 {
                            println!("PROGRESS {seq}");
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Timeout => {}
                    Err(e) if e.kind() == ErrorKind::Disconnected => {
                        // The importer died: it is an ordinary sender to us. Wait for the next.
                        disconnects += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("consumer: {e}"),
                }
            }
            println!(
                "RESULT last={last} lost={lost} dup={dup} disconnects={disconnects} max_wait_ms={}",
                max_wait.as_millis()
            );
            // Anything more would be a duplicate: look for one a little longer.
            let extra = rx.recv_timeout(Duration::from_millis(300)).map(|m| m.len()).ok();
            println!("EXTRA {extra:?}");
        }
        "exporter" => shmgadget_tunnel::export(&d, &tunnel_opts(false)).unwrap(),
        "importer" => shmgadget_tunnel::import(&d, &tunnel_opts(true)).unwrap(),
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn every_message_crosses_once_in_order_while_both_tunnel_ends_are_killed() {
    if let Some(r) = role() {
        child(&r);
        return;
    }
    let n = env_u64("T18_MESSAGES", 100_000);
    let kills = env_u64("T18_KILLS", 2);
    let hosts = match Hosts::make("t") {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: cannot make two network namespaces: {why}");
            return;
        }
    };
    let env = [("T18_MESSAGES", n.to_string())];
    let t0 = Instant::now();
    let mut consumer = hosts.spawn(&hosts.b, TEST, "consumer", &env);
    let mut cout = BufReader::new(consumer.stdout.take().unwrap());
    wait_for_line(&mut cout, "READY", Duration::from_secs(20));
    let mut producer = hosts.spawn(&hosts.a, TEST, "producer", &env);
    let mut pout = BufReader::new(producer.stdout.take().unwrap());
    wait_for_line(&mut pout, "READY", Duration::from_secs(20));
    let mut exporter = hosts.spawn(&hosts.a, TEST, "exporter", &env);
    let mut importer = hosts.spawn(&hosts.b, TEST, "importer", &env);

    // The consumer's progress, read on a thread, decides when to kill: at evenly spread points
    // of the stream, plus a random delay, so every kill lands mid-stream.
    let progress = Arc::new(AtomicU64::new(0));
    let result = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let (progress, result) = (progress.clone(), result.clone());
        std::thread::spawn(move || {
            for line in cout.lines() {
                let line = line.unwrap();
                if let Some(p) = line.strip_prefix("PROGRESS ") {
                    progress.store(p.parse().unwrap(), Ordering::Relaxed);
                } else if line.starts_with("RESULT") || line.starts_with("EXTRA") {
                    result.lock().unwrap().push(line);
                }
            }
        })
    };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("kill seed {seed:#x}, {n} messages, {kills} kills of each end");
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(200);
    'kills: for k in 0..2 * kills {
        let at = n * (k + 1) / (2 * kills + 1);
        while progress.load(Ordering::Relaxed) < at {
            if consumer.try_wait().unwrap().is_some() {
                break 'kills; // it gave up: the assertions below say why
            }
            assert!(
                Instant::now() < deadline,
                "no progress past {} (waiting for {at})",
                progress.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.next() % 20_000));
        if k % 2 == 0 {
            kill9(&mut importer);
            println!("killed the importer at about {at}");
            importer = hosts.spawn(&hosts.b, TEST, "importer", &env);
        } else {
            kill9(&mut exporter);
            println!("killed the exporter at about {at}");
            exporter = hosts.spawn(&hosts.a, TEST, "exporter", &env);
        }
    }
    let done = consumer.wait().unwrap();
    reader.join().unwrap();
    let elapsed = t0.elapsed();
    drop((pout, producer.stdin.take()));
    kill9(&mut producer);
    kill9(&mut exporter);
    kill9(&mut importer);
    let lines = result.lock().unwrap().clone();
    println!("{lines:?} in {elapsed:?} ({:.0} msg/s with the kills)", n as f64 / elapsed.as_secs_f64());
    drop(hosts);
    assert!(done.success(), "consumer failed");
    let res = lines.iter().find(|l| l.starts_with("RESULT")).expect("consumer result");
    assert!(res.contains(&format!("last={n} lost=0 dup=0 ")), "{res}");
    assert!(lines.iter().any(|l| l == "EXTRA None"), "a message after the last one: {lines:?}");
}

const DEAD_TEST: &str = "a_killed_tunnel_end_is_a_dead_peer_to_its_local_queue";

#[test]
fn a_killed_tunnel_end_is_a_dead_peer_to_its_local_queue() {
    if let Some(r) = role() {
        let d = Domain::attach(DOMAIN).unwrap();
        match r.as_str() {
            "exporter" => shmgadget_tunnel::export(&d, &tunnel_opts(false)).unwrap(),
            "importer" => shmgadget_tunnel::import(&d, &tunnel_opts(true)).unwrap(),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let hosts = match Hosts::make("d") {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: cannot make two network namespaces: {why}");
            return;
        }
    };
    let at = |shm: &str| {
        let opts = shmgadget::DomainOptions { shm_dir: Some(shm.into()), ..Default::default() };
        Domain::attach_with(DOMAIN, &opts).unwrap()
    };
    // Host B: the importer is the queue's sender; the consumer is told when it dies.
    let b = at(&hosts.b.shm);
    let mut importer = hosts.spawn(&hosts.b, DEAD_TEST, "importer", &[]);
    let start = Instant::now();
    let q = loop {
        match ByteQueue::open(&b, QUEUE) {
            Ok(q) => break q,
            Err(_) if start.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the importer did not create the queue: {e}"),
        }
    };
    let mut rx = q.receiver().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rx.try_recv().err().unwrap().kind(), ErrorKind::WouldBlock, "the importer is a live sender");
    kill9(&mut importer);
    let err = rx.recv_timeout(Duration::from_secs(5)).err().expect("nothing was sent");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");

    // Host A: the exporter is the queue's receiver; with no importer it acknowledges nothing,
    // so the ring fills (nothing is dropped) and the blocked producer is told when it dies.
    let a = at(&hosts.a.shm);
    let qa = ByteQueue::create(&a, QUEUE, 64 * 1024).unwrap();
    let mut tx = qa.sender().unwrap();
    let mut exporter = hosts.spawn(&hosts.a, DEAD_TEST, "exporter", &[]);
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tx.send_timeout(&[7; 64], Duration::from_millis(500)) {
            Ok(()) => sent += 1,
            Err(e) if e.kind() == ErrorKind::Timeout => break,
            Err(e) => panic!("before the exporter died: {e}"),
        }
        assert!(Instant::now() < deadline, "the ring never filled");
    }
    assert!(sent >= 64 * 1024 / 72 - 1, "the ring holds what was not acknowledged ({sent} sent)");
    kill9(&mut exporter);
    let err = tx.send_timeout(&[7; 64], Duration::from_secs(5)).expect_err("the ring is full");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
    drop((rx, tx));
    drop((q, qa));
    b.detach().unwrap();
    a.detach().unwrap();
}
