//! Queue throughput and latency between two processes (this binary re-executed as the
//! partner), as criterion benchmarks, each next to references measured in the same run: a pipe,
//! a Unix stream socket, `memcpy` of the same bytes, and a bare cache-line ping-pong. After the
//! criterion groups it prints the ratio table in Markdown (the one in BENCHMARKS.md), from the
//! same samples: throughput over the measured calls, round-trip percentiles over every round
//! trip timed.
//!
//! Run: `cargo bench -p shmgadget --bench queues` (`SHMG_BENCH_QUICK=1` for short runs; a
//! criterion filter such as `-- latency` runs some groups only). The byte queue's capacity
//! table comes from interleaved rounds outside criterion (`capacity_rounds`;
//! `SHMG_BENCH_REPS`, default 5): `-- capacity/rounds` runs those alone.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use shmgadget::heap::{Heap, ShmBox};
use shmgadget::queue::{BlockAddr, ByteQueue, SlotQueue, WaitMode};
use shmgadget::{Domain, DomainOptions, SectionOptions};

const ROLE: &str = "SHMG_QBENCH_ROLE";
const SIZES: [usize; 5] = [8, 64, 1024, 64 << 10, 1 << 20];
const CAPACITIES: [u64; 7] = [16, 64, 256, 1024, 4096, 16384, 65536];
/// Message sizes of the byte queue's capacity sweep (over `CAPACITIES` messages).
const RING_SIZES: [usize; 2] = [64, 1024];

/// The ring a byte queue needs for `msgs` messages of `size` bytes (8-byte record headers,
/// records padded to 8; `ByteQueue::create` rounds up to a power of two of at least 4 KiB).
fn ring_for(msgs: u64, size: usize) -> u64 {
    msgs * (8 + (size as u64).next_multiple_of(8))
}
const PAUSE: Duration = Duration::from_micros(300);

fn opts(must_exist: bool) -> DomainOptions {
    DomainOptions { window_size: 1 << 32, must_exist, ..Default::default() }
}

fn partner(role: &str, domain: &str, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .env("DOMAIN", domain)
        .env("ARG", arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or_default()
}

// ------------------------------------------------------------------ partner processes

/// Reads a round's message count (0: stop) from a stream.
fn read_count(r: &mut impl Read) -> u64 {
    let mut n = [0u8; 8];
    r.read_exact(&mut n).map(|_| u64::from_le_bytes(n)).unwrap_or(0)
}

fn run_partner(role: &str) {
    let domain = std::env::var("DOMAIN").unwrap();
    let arg = std::env::var("ARG").unwrap();
    let mut a = arg.split(',').map(|x| x.parse::<u64>().unwrap());
    match role {
        "bytes-sink" | "slots-sink" => {
            // Rounds: a count on "ctl", that many messages on "data", an ack on "ack".
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let ack = SlotQueue::<u64>::open(&d, "ack").unwrap();
            let ctl = SlotQueue::<u64>::open(&d, "ctl").unwrap();
            let (mut tx, mut ctl) = (ack.sender().unwrap(), ctl.receiver().unwrap());
            if role == "bytes-sink" {
                let q = ByteQueue::open(&d, "data").unwrap();
                let mut rx = q.receiver().unwrap();
                while let Ok(n @ 1..) = ctl.recv() {
                    let mut sum = 0u64;
                    for _ in 0..n {
                        sum = sum.wrapping_add(rx.recv().unwrap()[0] as u64);
                    }
                    tx.send(sum).unwrap();
                }
            } else {
                let q = SlotQueue::<[u8; 64]>::open(&d, "data").unwrap();
                let mut rx = q.receiver().unwrap();
                while let Ok(n @ 1..) = ctl.recv() {
                    let mut sum = 0u64;
                    for _ in 0..n {
                        sum = sum.wrapping_add(rx.recv().unwrap()[0] as u64);
                    }
                    tx.send(sum).unwrap();
                }
            }
        }
        "bytes-echo" => {
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let mode = if a.next() == Some(1) { WaitMode::Spin } else { WaitMode::Blocking };
            let ping = ByteQueue::open(&d, "ping").unwrap();
            let pong = ByteQueue::open(&d, "pong").unwrap();
            let mut rx = ping.receiver_with(mode).unwrap();
            let mut tx = pong.sender_with(mode).unwrap();
            while let Ok(m) = rx.recv() {
                tx.send(&m).unwrap();
            }
        }
        "line-echo" => {
            // Answers each odd value v with v + 1, until u64::MAX.
            let d = Domain::attach_with(&domain, &opts(true)).unwrap();
            let s = d.open_section("line").unwrap();
            let w = s.at::<AtomicU64>(0).unwrap();
            loop {
                let v = w.load(Ordering::Acquire);
                if v == u64::MAX {
                    break;
                }
                if v % 2 == 1 {
                    w.store(v + 1, Ordering::Release);
                }
                std::hint::spin_loop();
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
            let size = a.next().unwrap() as usize;
            let mut buf = vec![0u8; size];
            let (mut i, mut o) = (std::io::stdin().lock(), std::io::stdout().lock());
            loop {
                let n = read_count(&mut i);
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    i.read_exact(&mut buf).unwrap();
                }
                o.write_all(b"k").unwrap();
                o.flush().unwrap();
            }
        }
        "unix-sink" => {
            let size = a.next().unwrap() as usize;
            let mut s = UnixStream::connect(&domain).unwrap();
            let mut buf = vec![0u8; size];
            loop {
                let n = read_count(&mut s);
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    s.read_exact(&mut buf).unwrap();
                }
                s.write_all(b"k").unwrap();
            }
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
        other => panic!("unknown role {other}"),
    }
}

// ------------------------------------------------------------------ measuring through criterion

fn cleanup(d: &Domain, names: &[&str]) {
    for n in names {
        let _ = d.delete_section(n);
    }
}

/// Results kept from the criterion samples, for the ratio table: each call's (iterations,
/// time), and single round-trip times.
#[derive(Default)]
struct Results {
    rates: BTreeMap<String, Vec<(u64, Duration)>>,
    rtts: BTreeMap<String, Vec<Duration>>,
    /// Rates measured once per round (`capacity_rounds`).
    rounds: BTreeMap<String, Vec<f64>>,
}

impl Results {
    /// Iterations per second over the calls of `key`, leaving out the small warm-up calls
    /// (under 1% of the largest), whose fixed per-call cost would understate the rate.
    fn rate(&self, key: &str) -> f64 {
        let Some(v) = self.rates.get(key) else { return f64::NAN };
        let max = v.iter().map(|x| x.0).max().unwrap_or(0);
        let (n, t) = v.iter().filter(|x| x.0 * 100 >= max).fold((0u64, Duration::ZERO), |(n, t), x| (n + x.0, t + x.1));
        n as f64 / t.as_secs_f64()
    }
}

struct Bench {
    c: Criterion,
    d: Domain,
    results: RefCell<Results>,
}

impl Bench {
    fn quick() -> bool {
        std::env::var_os("SHMG_BENCH_QUICK").is_some()
    }

    /// Benchmarks `f(iters)` (which does `iters` iterations and returns their time) as
    /// `group/id`; keeps its rates under `key`.
    fn rate(&mut self, group: &str, id: BenchmarkId, bytes: u64, key: &str, mut f: impl FnMut(u64) -> Duration) {
        let quick = Self::quick();
        let results = &self.results;
        let mut g = self.c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(if quick { 100 } else { 500 }))
            .measurement_time(Duration::from_millis(if quick { 400 } else { 2000 }))
            .throughput(if bytes > 0 { Throughput::Bytes(bytes) } else { Throughput::Elements(1) });
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let t = f(iters);
                results.borrow_mut().rates.entry(key.to_owned()).or_default().push((iters, t));
                t
            })
        });
        g.finish();
    }

    /// Benchmarks round trips: `f(iters, out)` pushes each round trip's time to `out`.
    fn rtt(&mut self, group: &str, id: BenchmarkId, key: &str, mut f: impl FnMut(u64, &mut Vec<Duration>)) {
        let quick = Self::quick();
        let results = &self.results;
        let mut g = self.c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(if quick { 100 } else { 500 }))
            .measurement_time(Duration::from_millis(if quick { 400 } else { 2000 }));
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut v = Vec::with_capacity(iters as usize);
                f(iters, &mut v);
                let total = v.iter().sum();
                results.borrow_mut().rtts.entry(key.to_owned()).or_default().extend(v);
                total
            })
        });
        g.finish();
    }

    fn cleanup(&self, names: &[&str]) {
        cleanup(&self.d, names);
    }
}

/// Streams messages of `size` bytes through a byte queue with a `ring`-byte ring.
fn bench_bytes(b: &mut Bench, group: &str, id: BenchmarkId, key: &str, size: usize, ring: u64) {
    let d = b.d.clone();
    with_byte_stream(&d, size, ring, |run| b.rate(group, id, size as u64, key, run));
}

/// Sets up a stream of `size`-byte messages through a byte queue with a `ring`-byte ring to a
/// partner process, and gives `body` a function that streams `n` messages and returns the
/// time until the partner has them all.
fn with_byte_stream<R>(
    d: &Domain,
    size: usize,
    ring: u64,
    body: impl FnOnce(&mut dyn FnMut(u64) -> Duration) -> R,
) -> R {
    let q = ByteQueue::create(d, "data", ring).unwrap();
    let ack = SlotQueue::<u64>::create(d, "ack", 4).unwrap();
    let ctl = SlotQueue::<u64>::create(d, "ctl", 4).unwrap();
    let mut p = partner("bytes-sink", d.name(), "0");
    let r = {
        let mut tx = q.sender().unwrap();
        // A stream: publish in batches of an eighth of the ring, flushed after each burst.
        tx.set_batch(q.capacity() / 8);
        let (mut ack_rx, mut ctl_tx) = (ack.receiver().unwrap(), ctl.sender().unwrap());
        let msg = vec![1u8; size];
        let r = body(&mut |n| {
            ctl_tx.send(n).unwrap();
            let t = Instant::now();
            for _ in 0..n {
                tx.send(&msg).unwrap();
            }
            tx.flush();
            ack_rx.recv().unwrap();
            t.elapsed()
        });
        ctl_tx.send(0).unwrap();
        p.wait().unwrap();
        r
    };
    drop((q, ack, ctl));
    cleanup(d, &["data", "ack", "ctl"]);
    r
}

/// The byte queue's capacity sweep in interleaved rounds: every round streams through every
/// capacity of `RING_SIZES` x `CAPACITIES` once (odd rounds in reverse order), so that a change
/// of load, or of where the hypervisor runs our two vCPUs (a bare cache-line round trip here
/// moves between about 100 and 250 ns from one second to the next), reaches every capacity
/// alike. Each measurement streams two laps of the ring (at least) as a warm-up, then for
/// `secs`; the table shows each capacity's median over the rounds.
fn capacity_rounds(b: &mut Bench) {
    let reps: usize = std::env::var("SHMG_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let secs = Duration::from_millis(if Bench::quick() { 60 } else { 200 });
    let d = b.d.clone();
    let mut order: Vec<(usize, u64)> = RING_SIZES.iter().flat_map(|&s| CAPACITIES.map(|c| (s, c))).collect();
    for rep in 0..reps {
        eprintln!("capacity sweep: round {} of {reps}", rep + 1);
        for &(size, msgs) in &order {
            let ring = ring_for(msgs, size);
            // Chunks of about 4 MiB (one control round trip each, a few microseconds).
            let chunk = (4u64 << 20) / size as u64;
            let rate = with_byte_stream(&d, size, ring, |run| {
                let lap = ring.next_power_of_two().max(4096) / (8 + size as u64);
                run((2 * lap).max(chunk));
                let (mut n, mut t) = (0u64, Duration::ZERO);
                while t < secs {
                    t += run(chunk);
                    n += chunk;
                }
                n as f64 / t.as_secs_f64()
            });
            b.results.borrow_mut().rounds.entry(format!("ring{size}/{msgs}")).or_default().push(rate);
        }
        order.reverse();
    }
}

fn bench_slots(b: &mut Bench, capacity: u64) {
    let d = b.d.clone();
    let q = SlotQueue::<[u8; 64]>::create(&d, "data", capacity).unwrap();
    let ack = SlotQueue::<u64>::create(&d, "ack", 4).unwrap();
    let ctl = SlotQueue::<u64>::create(&d, "ctl", 4).unwrap();
    let mut p = partner("slots-sink", d.name(), "0");
    {
        let mut tx = q.sender().unwrap();
        let (mut ack_rx, mut ctl_tx) = (ack.receiver().unwrap(), ctl.sender().unwrap());
        let v = [1u8; 64];
        let id = BenchmarkId::new("slot_queue_64B", capacity);
        b.rate("capacity", id, 64, &format!("slots/{capacity}"), |iters| {
            ctl_tx.send(iters).unwrap();
            let t = Instant::now();
            for _ in 0..iters {
                tx.send(v).unwrap();
            }
            ack_rx.recv().unwrap();
            t.elapsed()
        });
        ctl_tx.send(0).unwrap();
        p.wait().unwrap();
    }
    drop((q, ack, ctl));
    b.cleanup(&["data", "ack", "ctl"]);
}

/// A stream of `size`-byte messages through a pipe (`unix`: a Unix stream socket).
fn bench_stream(b: &mut Bench, size: usize, unix: bool) {
    let arg = size.to_string();
    let msg = vec![1u8; size];
    let name = if unix { "unix_socket" } else { "pipe" };
    let path = std::env::temp_dir().join(format!("shmg-qbench-{}.sock", std::process::id()));
    let (mut child, mut w, mut r): (Child, Box<dyn Write>, Box<dyn Read>) = if unix {
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let child = partner("unix-sink", path.to_str().unwrap(), &arg);
        let (s, _) = l.accept().unwrap();
        (child, Box::new(s.try_clone().unwrap()), Box::new(s))
    } else {
        let mut child = partner("pipe-sink", "-", &arg);
        let (i, o): (ChildStdin, ChildStdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
        (child, Box::new(i), Box::new(o))
    };
    b.rate("size", BenchmarkId::new(name, size), size as u64, &format!("{name}/{size}"), |iters| {
        w.write_all(&iters.to_le_bytes()).unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            w.write_all(&msg).unwrap();
        }
        w.flush().unwrap();
        let mut k = [0u8; 1];
        r.read_exact(&mut k).unwrap();
        t.elapsed()
    });
    w.write_all(&0u64.to_le_bytes()).unwrap();
    drop(w);
    child.wait().unwrap();
    let _ = std::fs::remove_file(&path);
}

fn bench_memcpy(b: &mut Bench, size: usize) {
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    b.rate("size", BenchmarkId::new("memcpy", size), size as u64, &format!("memcpy/{size}"), |iters| {
        let t = Instant::now();
        for _ in 0..iters {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
        t.elapsed()
    });
}

/// Round trips through two byte queues; with `pause`, the echoing side is asleep each time.
fn bench_bytes_rtt(b: &mut Bench, size: usize, mode: WaitMode, pause: Option<Duration>) {
    let d = b.d.clone();
    let ping = ByteQueue::create(&d, "ping", 64 << 10).unwrap();
    let pong = ByteQueue::create(&d, "pong", 64 << 10).unwrap();
    let mut p = partner("bytes-echo", d.name(), &format!("{}", (mode == WaitMode::Spin) as u8));
    {
        let mut tx = ping.sender_with(mode).unwrap();
        let mut rx = pong.receiver_with(mode).unwrap();
        let msg = vec![7u8; size];
        let name = match (mode, pause) {
            (_, Some(_)) => "asleep",
            (WaitMode::Spin, _) => "spin",
            _ => "blocking",
        };
        let group = if pause.is_some() { "latency_asleep" } else { "latency" };
        b.rtt(group, BenchmarkId::new(name, size), &format!("{name}/{size}"), |iters, out| {
            for _ in 0..iters {
                if let Some(p) = pause {
                    std::thread::sleep(p);
                }
                let t = Instant::now();
                tx.send(&msg).unwrap();
                drop(rx.recv().unwrap());
                out.push(t.elapsed());
            }
        });
    }
    p.wait().unwrap();
    drop((ping, pong));
    b.cleanup(&["ping", "pong"]);
}

fn bench_pipe_rtt(b: &mut Bench, size: usize, pause: Option<Duration>) {
    let mut p = partner("pipe-echo", "-", &size.to_string());
    let (mut i, mut o) = (p.stdin.take().unwrap(), p.stdout.take().unwrap());
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    let name = if pause.is_some() { "pipe_asleep" } else { "pipe" };
    let group = if pause.is_some() { "latency_asleep" } else { "latency" };
    b.rtt(group, BenchmarkId::new(name, size), &format!("{name}/{size}"), |iters, out| {
        for _ in 0..iters {
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
            let t = Instant::now();
            i.write_all(&msg).unwrap();
            o.read_exact(&mut buf).unwrap();
            out.push(t.elapsed());
        }
    });
    drop(i);
    p.wait().unwrap();
}

fn bench_line_rtt(b: &mut Bench) {
    let d = b.d.clone();
    let s = d.create_section("line", 4096, &SectionOptions::new()).unwrap();
    let w = s.at::<AtomicU64>(0).unwrap();
    w.store(0, Ordering::Relaxed);
    let mut p = partner("line-echo", d.name(), "0");
    let mut v = 0u64;
    b.rtt("latency", BenchmarkId::new("cache_line", 8), "line", |iters, out| {
        for _ in 0..iters {
            let t = Instant::now();
            w.store(v + 1, Ordering::Release);
            while w.load(Ordering::Acquire) != v + 2 {
                std::hint::spin_loop();
            }
            out.push(t.elapsed());
            v += 2;
        }
    });
    w.store(u64::MAX, Ordering::Release);
    p.wait().unwrap();
    drop(s);
    b.cleanup(&["line"]);
}

fn bench_handover(b: &mut Bench, heap: &Heap, size: usize) {
    let d = b.d.clone();
    let give = SlotQueue::<BlockAddr>::create(&d, "give", 4).unwrap();
    let back = SlotQueue::<BlockAddr>::create(&d, "back", 4).unwrap();
    let mut p = partner("handover-echo", d.name(), "0");
    let layout = std::alloc::Layout::from_size_align(size, 16).unwrap();
    let mut block = heap.alloc_zeroed(layout).unwrap();
    {
        let mut tx = give.sender().unwrap();
        let mut rx = back.receiver().unwrap();
        b.rtt("zero_copy", BenchmarkId::new("handover", size), &format!("handover/{size}"), |iters, out| {
            for _ in 0..iters {
                // SAFETY: a live block of this heap, owned by whoever holds its address: us now.
                let bx: ShmBox<u8> = unsafe { ShmBox::from_raw_in(block.as_ptr(), heap.allocator()) };
                let t = Instant::now();
                tx.send(BlockAddr::from_box(bx)).unwrap();
                let got = rx.recv().unwrap();
                out.push(t.elapsed());
                block = std::ptr::NonNull::new(got.addr() as *mut u8).unwrap();
            }
        });
    }
    p.wait().unwrap();
    // SAFETY: the block came back; nobody else uses it.
    unsafe { heap.free(block).unwrap() };
    drop((give, back));
    b.cleanup(&["give", "back"]);
}

// ------------------------------------------------------------------ the table

/// The median of `v` (NaN when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn fmt_rate(r: f64, size: usize) -> String {
    format!("{:.2} M/s ({:.0} MB/s)", r / 1e6, r * size as f64 / 1e6)
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn print_table(r: &Results) {
    let rate = |k: &str| r.rate(k);
    let lat = |k: &str| {
        let v = r.rtts.get(k).map(Vec::as_slice).unwrap_or(&[]);
        (percentile(v, 0.5), percentile(v, 0.99))
    };
    println!("## Throughput by message size (one sender process, one receiver process)\n");
    println!("| size | shmgadget byte queue | pipe | Unix socket | memcpy | queue/pipe | queue/memcpy |");
    println!("|---|---|---|---|---|---|---|");
    for size in SIZES {
        let (q, p, u, m) = (
            rate(&format!("bytes/{size}")),
            rate(&format!("pipe/{size}")),
            rate(&format!("unix_socket/{size}")),
            rate(&format!("memcpy/{size}")),
        );
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
    let rates: Vec<f64> = CAPACITIES.iter().map(|c| rate(&format!("slots/{c}"))).collect();
    let best = rates.iter().cloned().fold(0.0, f64::max);
    for (c, x) in CAPACITIES.iter().zip(&rates) {
        println!("| {c} | {} | {:.2} |", fmt_rate(*x, 64), x / best);
    }
    for size in RING_SIZES {
        let rounds = |c: &u64| r.rounds.get(&format!("ring{size}/{c}")).cloned().unwrap_or_default();
        let n = rounds(&CAPACITIES[0]).len();
        println!(
            "\n## Throughput against capacity ({size}-byte messages, byte queue; medians of {n} interleaved rounds)\n"
        );
        println!(
            "| capacity (messages) | ring | throughput | range over the rounds | vs best | median of the rounds' vs best |"
        );
        println!("|---|---|---|---|---|---|");
        let medians: Vec<f64> = CAPACITIES.iter().map(|c| median(&rounds(c))).collect();
        let best = medians.iter().cloned().fold(0.0, f64::max);
        // Each round's best capacity, for the per-round ratios.
        let round_best: Vec<f64> =
            (0..n).map(|i| CAPACITIES.iter().map(|c| rounds(c)[i]).fold(0.0, f64::max)).collect();
        for (c, x) in CAPACITIES.iter().zip(&medians) {
            let ring = ring_for(*c, size).next_power_of_two().max(4096);
            let v = rounds(c);
            let (lo, hi) = v.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            let per_round = median(&v.iter().zip(&round_best).map(|(x, b)| x / b).collect::<Vec<_>>());
            println!(
                "| {c} | {} KiB | {} | {:.1}-{:.1} M/s | {:.2} | {:.2} |",
                ring >> 10,
                fmt_rate(*x, size),
                lo / 1e6,
                hi / 1e6,
                x / best,
                per_round
            );
        }
    }
    println!("\n## Round-trip latency (median / 99th percentile)\n");
    println!("| message | blocking | spin | pipe | bare cache-line ping-pong |");
    println!("|---|---|---|---|---|");
    let line = lat("line");
    for size in [8usize, 1024] {
        let (b, s, p) = (lat(&format!("blocking/{size}")), lat(&format!("spin/{size}")), lat(&format!("pipe/{size}")));
        println!(
            "| {size} B | {} / {} | {} / {} | {} / {} | {} / {} |",
            us(b.0),
            us(b.1),
            us(s.0),
            us(s.1),
            us(p.0),
            us(p.1),
            us(line.0),
            us(line.1)
        );
    }
    println!("\n## Round trip after the other side fell asleep (a 300 µs pause before each; median / 99th)\n");
    println!("| message | blocking (futex wake-up) | pipe | blocking/pipe |");
    println!("|---|---|---|---|");
    for size in [8usize, 1024] {
        let (b, p) = (lat(&format!("asleep/{size}")), lat(&format!("pipe_asleep/{size}")));
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
    for size in [1usize << 20, 64 << 20] {
        println!("| {} MiB | {} |", size >> 20, us(lat(&format!("handover/{size}")).0));
    }
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        run_partner(&role);
        return;
    }
    let name = format!("bench-queues-{}", std::process::id());
    let d = Domain::attach_with(&name, &opts(false)).unwrap();
    let mut b = Bench { c: Criterion::default().configure_from_args(), d: d.clone(), results: Default::default() };

    for size in SIZES {
        let ring = (4 * size as u64 + 64).max(256 << 10);
        bench_bytes(&mut b, "size", BenchmarkId::new("byte_queue", size), &format!("bytes/{size}"), size, ring);
        bench_stream(&mut b, size, false);
        bench_stream(&mut b, size, true);
        bench_memcpy(&mut b, size);
    }
    for capacity in CAPACITIES {
        bench_slots(&mut b, capacity);
    }
    for size in RING_SIZES {
        for msgs in CAPACITIES {
            let id = BenchmarkId::new(format!("byte_queue_{size}B_messages"), msgs);
            bench_bytes(&mut b, "capacity", id, &format!("ring{size}/{msgs}"), size, ring_for(msgs, size));
        }
    }
    // The rounds are not criterion benchmarks: they run when no filter is given or when the
    // filter is part of "capacity/rounds" (`-- capacity/rounds` runs them alone).
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_none_or(|f| "capacity/rounds".contains(f.as_str())) {
        capacity_rounds(&mut b);
    }
    bench_line_rtt(&mut b);
    for size in [8usize, 1024] {
        bench_bytes_rtt(&mut b, size, WaitMode::Blocking, None);
        bench_bytes_rtt(&mut b, size, WaitMode::Spin, None);
        bench_pipe_rtt(&mut b, size, None);
        bench_bytes_rtt(&mut b, size, WaitMode::Blocking, Some(PAUSE));
        bench_pipe_rtt(&mut b, size, Some(PAUSE));
    }
    let heap = Heap::create(&d, "blocks", 128 << 20).unwrap();
    for size in [1usize << 20, 64 << 20] {
        bench_handover(&mut b, &heap, size);
    }
    drop(heap);
    b.cleanup(&["blocks"]);
    let Bench { c, d: _, results } = b;
    c.final_summary();
    println!();
    print_table(&results.borrow());
    d.detach().unwrap();
}
