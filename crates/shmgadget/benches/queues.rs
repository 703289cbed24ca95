//! Queue throughput and latency between two processes, next to references measured in the same
//! run: a pipe, a Unix stream socket, `memcpy` of the same bytes, and a bare cache-line
//! ping-pong. Each figure is the median of several runs; the table is printed in Markdown (the
//! one in BENCHMARKS.md comes from here).
//!
//! Run: `cargo bench -p shmgadget --bench queues` (add `-- quick` for fewer, shorter runs).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shmgadget::heap::{Heap, ShmBox};
use shmgadget::queue::{BlockAddr, ByteQueue, SlotQueue, WaitMode};
use shmgadget::{Domain, DomainOptions, SectionOptions};

const ROLE: &str = "SHMG_QBENCH_ROLE";

fn opts(must_exist: bool) -> DomainOptions {
    DomainOptions { window_size: 1 << 32, must_exist, ..Default::default() }
}

fn partner(role: &str, domain: &str, arg: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .env("DOMAIN", domain)
        .env("ARG", arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Messages for about `secs` of traffic at an expected rate.
fn count_for(size: usize) -> u64 {
    (((256u64 << 20) / size.max(64) as u64).clamp(200, 2_000_000) as f64 * speed()) as u64
}

fn speed() -> f64 {
    if std::env::args().any(|a| a == "quick") { 0.25 } else { 1.0 }
}

// ------------------------------------------------------------------ partner processes

fn run_partner(role: &str) {
    let domain = std::env::var("DOMAIN").unwrap();
    let arg = std::env::var("ARG").unwrap();
    let mut a = arg.split(',').map(|x| x.parse::<u64>().unwrap());
    match role {
        "bytes-sink" => {
            // Receives (size, n) rounds until n == 0; acks each round on "ack".
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let q = ByteQueue::open(&d, "data").unwrap();
            let ack = SlotQueue::<u64>::open(&d, "ack").unwrap();
            let mode = if a.next() == Some(1) { WaitMode::Spin } else { WaitMode::Blocking };
            let mut rx = q.receiver_with(mode).unwrap();
            let mut tx = ack.sender().unwrap();
            let ctl = SlotQueue::<u64>::open(&d, "ctl").unwrap();
            let mut ctl = ctl.receiver().unwrap();
            loop {
                let n = ctl.recv().unwrap();
                if n == 0 {
                    break;
                }
                let mut sum = 0u64;
                for _ in 0..n {
                    let m = rx.recv().unwrap();
                    sum = sum.wrapping_add(m[0] as u64);
                }
                tx.send(sum).unwrap();
            }
        }
        "slots-sink" => {
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let q = SlotQueue::<[u8; 64]>::open(&d, "data").unwrap();
            let ack = SlotQueue::<u64>::open(&d, "ack").unwrap();
            let mut rx = q.receiver().unwrap();
            let mut tx = ack.sender().unwrap();
            let n = a.next().unwrap();
            let mut sum = 0u64;
            for _ in 0..n {
                sum = sum.wrapping_add(rx.recv().unwrap()[0] as u64);
            }
            tx.send(sum).unwrap();
        }
        "bytes-echo" => {
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let mode = if a.next() == Some(1) { WaitMode::Spin } else { WaitMode::Blocking };
            let ping = ByteQueue::open(&d, "ping").unwrap();
            let pong = ByteQueue::open(&d, "pong").unwrap();
            let mut rx = ping.receiver_with(mode).unwrap();
            let mut tx = pong.sender_with(mode).unwrap();
            loop {
                let m = match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                };
                tx.send(&m).unwrap();
            }
        }
        "line-echo" => {
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let s = d.open_section("line").unwrap();
            let w = s.at::<AtomicU64>(0).unwrap();
            let n = a.next().unwrap();
            for i in 0..n {
                while w.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                w.store(2 * i + 2, Ordering::Release);
            }
        }
        "handover-echo" => {
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let q = SlotQueue::<BlockAddr>::open(&d, "give").unwrap();
            let back = SlotQueue::<BlockAddr>::open(&d, "back").unwrap();
            let mut rx = q.receiver().unwrap();
            let mut tx = back.sender().unwrap();
            while let Ok(b) = rx.recv() {
                tx.send(b).unwrap();
            }
        }
        "pipe-sink" => {
            let (size, n) = (a.next().unwrap() as usize, a.next().unwrap());
            let mut buf = vec![0u8; size];
            let mut stdin = std::io::stdin().lock();
            for _ in 0..n {
                stdin.read_exact(&mut buf).unwrap();
            }
            std::io::stdout().write_all(b"k").unwrap();
        }
        "pipe-echo" => {
            let size = a.next().unwrap() as usize;
            let mut buf = vec![0u8; size];
            let (mut i, mut o) = (std::io::stdin().lock(), std::io::stdout().lock());
            while i.read_exact(&mut buf).is_ok() {
                o.write_all(&buf).unwrap();
                o.flush().unwrap();
            }
        }
        "unix-sink" => {
            let (size, n) = (a.next().unwrap() as usize, a.next().unwrap());
            let mut s = UnixStream::connect(&domain).unwrap();
            let mut buf = vec![0u8; size];
            for _ in 0..n {
                s.read_exact(&mut buf).unwrap();
            }
            s.write_all(b"k").unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

// ------------------------------------------------------------------ measurements

struct Setup {
    d: Domain,
}

impl Setup {
    /// Messages per second of `size` bytes through a byte queue with a `ring`-byte ring.
    fn bytes_throughput(&self, size: usize, ring: u64, runs: usize, mode: WaitMode) -> f64 {
        let d = &self.d;
        let q = ByteQueue::create(d, "data", ring).unwrap();
        let ack = SlotQueue::<u64>::create(d, "ack", 4).unwrap();
        let ctl = SlotQueue::<u64>::create(d, "ctl", 4).unwrap();
        let mut p = partner("bytes-sink", d.name(), &format!("{}", (mode == WaitMode::Spin) as u8));
        let mut tx = q.sender_with(mode).unwrap();
        // A stream: publish in batches of an eighth of the ring (flushed at the end).
        tx.set_batch(q.capacity() / 8);
        let mut ack_rx = ack.receiver().unwrap();
        let mut ctl_tx = ctl.sender().unwrap();
        let msg = vec![1u8; size];
        let n = count_for(size);
        let mut rates = Vec::new();
        for _ in 0..runs {
            ctl_tx.send(n).unwrap();
            let t = Instant::now();
            for _ in 0..n {
                tx.send(&msg).unwrap();
            }
            tx.flush();
            ack_rx.recv().unwrap();
            rates.push(n as f64 / t.elapsed().as_secs_f64());
        }
        ctl_tx.send(0).unwrap();
        p.wait().unwrap();
        drop((tx, ack_rx, ctl_tx));
        drop((q, ack, ctl));
        for s in ["data", "ack", "ctl"] {
            d.delete_section(s).unwrap();
        }
        median(rates)
    }

    fn slots_throughput(&self, capacity: u64, runs: usize) -> f64 {
        let d = &self.d;
        let mut rates = Vec::new();
        for _ in 0..runs {
            let q = SlotQueue::<[u8; 64]>::create(d, "data", capacity).unwrap();
            let ack = SlotQueue::<u64>::create(d, "ack", 4).unwrap();
            let n = count_for(64) / 2;
            let mut p = partner("slots-sink", d.name(), &n.to_string());
            let mut tx = q.sender().unwrap();
            let mut ack_rx = ack.receiver().unwrap();
            let v = [1u8; 64];
            let t = Instant::now();
            for _ in 0..n {
                tx.send(v).unwrap();
            }
            ack_rx.recv().unwrap();
            rates.push(n as f64 / t.elapsed().as_secs_f64());
            p.wait().unwrap();
            drop((tx, ack_rx));
            drop((q, ack));
            d.delete_section("data").unwrap();
            d.delete_section("ack").unwrap();
        }
        median(rates)
    }

    /// Round trips of `size`-byte messages; with `pause`, each round trip starts after a
    /// pause long enough for the echoing side to stop spinning and sleep.
    fn bytes_rtt(&self, size: usize, mode: WaitMode, n: usize, pause: Option<Duration>) -> (Duration, Duration) {
        let d = &self.d;
        let ping = ByteQueue::create(d, "ping", 64 << 10).unwrap();
        let pong = ByteQueue::create(d, "pong", 64 << 10).unwrap();
        let mut p = partner("bytes-echo", d.name(), &format!("{}", (mode == WaitMode::Spin) as u8));
        let mut tx = ping.sender_with(mode).unwrap();
        let mut rx = pong.receiver_with(mode).unwrap();
        let msg = vec![7u8; size];
        let mut rtts = Vec::with_capacity(n);
        for i in 0..n + 100 {
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
            let t = Instant::now();
            tx.send(&msg).unwrap();
            drop(rx.recv().unwrap());
            if i >= 100 {
                rtts.push(t.elapsed());
            }
        }
        drop(tx);
        p.wait().unwrap();
        drop(rx);
        drop((ping, pong));
        d.delete_section("ping").unwrap();
        d.delete_section("pong").unwrap();
        (percentile(&mut rtts, 0.5), percentile(&mut rtts, 0.99))
    }

    fn line_rtt(&self, n: u64) -> (Duration, Duration) {
        let d = &self.d;
        let s = d.create_section("line", 4096, &SectionOptions::new()).unwrap();
        let w = s.at::<AtomicU64>(0).unwrap();
        w.store(0, Ordering::Relaxed);
        let mut p = partner("line-echo", d.name(), &(n + 100).to_string());
        let mut rtts = Vec::new();
        for i in 0..n + 100 {
            let t = Instant::now();
            w.store(2 * i + 1, Ordering::Release);
            while w.load(Ordering::Acquire) != 2 * i + 2 {
                std::hint::spin_loop();
            }
            if i >= 100 {
                rtts.push(t.elapsed());
            }
        }
        p.wait().unwrap();
        drop(s);
        d.delete_section("line").unwrap();
        (percentile(&mut rtts, 0.5), percentile(&mut rtts, 0.99))
    }

    fn handover(&self, heap: &Heap, size: usize, n: usize) -> Duration {
        let d = &self.d;
        let give = SlotQueue::<BlockAddr>::create(d, "give", 4).unwrap();
        let back = SlotQueue::<BlockAddr>::create(d, "back", 4).unwrap();
        let mut p = partner("handover-echo", d.name(), "0");
        let mut tx = give.sender().unwrap();
        let mut rx = back.receiver().unwrap();
        let layout = std::alloc::Layout::from_size_align(size, 16).unwrap();
        let mut block = heap.alloc_zeroed(layout).unwrap();
        let mut times = Vec::new();
        for _ in 0..n {
            // SAFETY: a live block of `size` bytes of this heap, owned by whoever holds its address.
            let b: ShmBox<u8> = unsafe { ShmBox::from_raw_in(block.as_ptr(), heap.allocator()) };
            let t = Instant::now();
            tx.send(BlockAddr::from_box(b)).unwrap();
            let got = rx.recv().unwrap();
            times.push(t.elapsed());
            block = std::ptr::NonNull::new(got.addr() as *mut u8).unwrap();
        }
        drop(tx);
        p.wait().unwrap();
        // SAFETY: the block came back; nobody else uses it.
        unsafe { heap.free(block).unwrap() };
        drop(rx);
        drop((give, back));
        d.delete_section("give").unwrap();
        d.delete_section("back").unwrap();
        percentile(&mut times, 0.5)
    }
}

fn pipe_throughput(size: usize, runs: usize) -> f64 {
    let n = count_for(size);
    let msg = vec![1u8; size];
    let mut rates = Vec::new();
    for _ in 0..runs {
        let mut p = partner("pipe-sink", "-", &format!("{size},{n}"));
        let mut stdin = p.stdin.take().unwrap();
        let t = Instant::now();
        for _ in 0..n {
            stdin.write_all(&msg).unwrap();
        }
        let mut k = [0u8; 1];
        p.stdout.as_mut().unwrap().read_exact(&mut k).unwrap();
        rates.push(n as f64 / t.elapsed().as_secs_f64());
        p.wait().unwrap();
    }
    median(rates)
}

fn unix_throughput(size: usize, runs: usize) -> f64 {
    let n = count_for(size);
    let msg = vec![1u8; size];
    let mut rates = Vec::new();
    for r in 0..runs {
        let path = std::env::temp_dir().join(format!("shmg-qbench-{}-{r}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let mut p = partner("unix-sink", path.to_str().unwrap(), &format!("{size},{n}"));
        let (mut s, _) = l.accept().unwrap();
        let t = Instant::now();
        for _ in 0..n {
            s.write_all(&msg).unwrap();
        }
        let mut k = [0u8; 1];
        s.read_exact(&mut k).unwrap();
        rates.push(n as f64 / t.elapsed().as_secs_f64());
        p.wait().unwrap();
        let _ = std::fs::remove_file(&path);
    }
    median(rates)
}

fn pipe_rtt(size: usize, n: usize, pause: Option<Duration>) -> (Duration, Duration) {
    let mut p = partner("pipe-echo", "-", &size.to_string());
    let (mut i, mut o) = (p.stdin.take().unwrap(), p.stdout.take().unwrap());
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    let mut rtts = Vec::new();
    for k in 0..n + 100 {
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
        let t = Instant::now();
        i.write_all(&msg).unwrap();
        o.read_exact(&mut buf).unwrap();
        if k >= 100 {
            rtts.push(t.elapsed());
        }
    }
    drop(i);
    p.wait().unwrap();
    (percentile(&mut rtts, 0.5), percentile(&mut rtts, 0.99))
}

fn memcpy_rate(size: usize) -> f64 {
    let n = count_for(size);
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    let t = Instant::now();
    for _ in 0..n {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn fmt_rate(r: f64, size: usize) -> String {
    format!("{:.2} M/s ({:.0} MB/s)", r / 1e6, r * size as f64 / 1e6)
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        run_partner(&role);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` / criterion-style listing: nothing to list.
    }
    let runs = if speed() < 1.0 { 3 } else { 5 };
    let name = format!("bench-queues-{}", std::process::id());
    let d = Domain::attach_with(&name, &opts(false)).unwrap();
    let s = Setup { d };

    println!("## Throughput by message size (one sender process, one receiver process)\n");
    println!("| size | shmgadget byte queue | pipe | Unix socket | memcpy | queue/pipe | queue/memcpy |");
    println!("|---|---|---|---|---|---|---|");
    for size in [8usize, 64, 1024, 64 << 10, 1 << 20] {
        let q = s.bytes_throughput(size, (4 * size as u64 + 64).max(256 << 10), runs, WaitMode::Blocking);
        let p = pipe_throughput(size, runs);
        let u = unix_throughput(size, runs);
        let m = memcpy_rate(size);
        println!(
            "| {size} B | {} | {} | {} | {} | {:.1}× | {:.2}× |",
            fmt_rate(q, size),
            fmt_rate(p, size),
            fmt_rate(u, size),
            fmt_rate(m, size),
            q / p,
            q / m
        );
    }

    println!("\n## Throughput against capacity (64-byte values, slot queue)\n");
    println!("| capacity (messages) | throughput | vs best |");
    println!("|---|---|---|");
    let caps = [16u64, 64, 256, 1024, 4096, 16384, 65536];
    let rates: Vec<f64> = caps.iter().map(|&c| s.slots_throughput(c, runs)).collect();
    let best = rates.iter().cloned().fold(0.0, f64::max);
    for (c, r) in caps.iter().zip(&rates) {
        println!("| {c} | {} | {:.2} |", fmt_rate(*r, 64), r / best);
    }
    println!("\n## Throughput against capacity (64-byte messages, byte queue)\n");
    println!("| ring | throughput |");
    println!("|---|---|");
    for ring in [4u64 << 10, 64 << 10, 1 << 20, 16 << 20] {
        let r = s.bytes_throughput(64, ring, runs, WaitMode::Blocking);
        println!("| {} KiB | {} |", ring >> 10, fmt_rate(r, 64));
    }

    println!("\n## Round-trip latency (median / 99th percentile)\n");
    println!("| message | blocking | spin | pipe | bare cache-line ping-pong |");
    println!("|---|---|---|---|---|");
    let n = (20_000.0 * speed()) as usize;
    let line = s.line_rtt(n as u64);
    for size in [8usize, 1024] {
        let b = s.bytes_rtt(size, WaitMode::Blocking, n, None);
        let sp = s.bytes_rtt(size, WaitMode::Spin, n, None);
        let p = pipe_rtt(size, n, None);
        println!(
            "| {size} B | {} / {} | {} / {} | {} / {} | {} / {} |",
            us(b.0),
            us(b.1),
            us(sp.0),
            us(sp.1),
            us(p.0),
            us(p.1),
            us(line.0),
            us(line.1)
        );
    }

    println!("\n## Round trip after the other side fell asleep (a 300 µs pause before each; median / 99th)\n");
    println!("| message | blocking (futex wake-up) | pipe | blocking/pipe |");
    println!("|---|---|---|---|");
    let pause = Some(Duration::from_micros(300));
    for size in [8usize, 1024] {
        let b = s.bytes_rtt(size, WaitMode::Blocking, n / 10, pause);
        let p = pipe_rtt(size, n / 10, pause);
        println!(
            "| {size} B | {} / {} | {} / {} | {:.2}× |",
            us(b.0),
            us(b.1),
            us(p.0),
            us(p.1),
            b.0.as_secs_f64() / p.0.as_secs_f64()
        );
    }

    println!("\n## Zero-copy hand-over of a heap block (send its address, get it back; median)\n");
    println!("| block | round trip |");
    println!("|---|---|");
    let heap = Heap::create(&s.d, "blocks", 128 << 20).unwrap();
    for size in [1usize << 20, 64 << 20] {
        println!("| {} MiB | {} |", size >> 20, us(s.handover(&heap, size, 2000)));
    }
    drop(heap);
    s.d.delete_section("blocks").unwrap();
    let Setup { d } = s;
    d.detach().unwrap();
}
