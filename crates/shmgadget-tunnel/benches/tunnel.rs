//! Throughput and latency of the tunnel between two network namespaces, against references
//! measured in the same run between the same namespaces: a plain TCP stream (the same
//! payloads, written in 64 KiB batches) and zenoh pub/sub used directly.
//!
//! `cargo bench -p shmgadget-tunnel` (root: it makes two network namespaces). Every rate is
//! measured by the receiving process, from its first message to its last.
//! `T18_BENCH_N64` and `T18_BENCH_N4K` set the message counts, `T18_BENCH_REPS` the runs per
//! measurement (medians are reported), `T18_BENCH_ONLY` the parts (`64,4096,rtt`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Host, Hosts, kill9, role, wait_for_line};
use shmgadget::Domain;
use shmgadget::queue::ByteQueue;
use shmgadget_tunnel::Options;
use zenoh::Wait;
use zenoh::qos::CongestionControl;

const DOMAIN: &str = "t18bench";

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"))
}

fn envu(k: &str) -> u64 {
    env(k).parse().unwrap()
}

fn addr(host: char) -> String {
    env(if host == 'a' { "T18_ADDR_A" } else { "T18_ADDR_B" })
}

fn zconfig(listen: &str, connect: Option<&str>) -> zenoh::Config {
    let o = Options {
        mode: Some("peer".into()),
        listen: vec![listen.into()],
        connect: connect.map(|c| vec![c.to_owned()]).unwrap_or_default(),
        no_scouting: true,
        ..Default::default()
    };
    o.zenoh_config().unwrap()
}

fn payload(size: usize, seq: u64) -> Vec<u8> {
    let mut m = vec![0x5a; size];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m
}

fn report(n: u64, size: u64, dt: Duration) {
    println!("RATE {} {}", n as f64 / dt.as_secs_f64(), (n * size) as f64 / dt.as_secs_f64());
}

/// One process of a measurement (in a namespace, with its own shm directory).
fn child(role: &str) {
    let n = envu("T18_N");
    let size = envu("T18_SIZE") as usize;
    match role {
        // Tunnel: the exporter and importer are real tunnel ends; T18_LISTEN / T18_CONNECT.
        "exporter" | "importer" => {
            let d = Domain::attach(DOMAIN).unwrap();
            let opts = Options {
                queue: env("T18_QUEUE"),
                mode: Some("peer".into()),
                listen: vec![env("T18_LISTEN")],
                connect: std::env::var("T18_CONNECT").ok().into_iter().collect(),
                no_scouting: true,
                capacity: 4 << 20,
                ..Default::default()
            };
            if role == "exporter" {
                shmgadget_tunnel::export(&d, &opts).unwrap()
            } else {
                shmgadget_tunnel::import(&d, &opts).unwrap()
            }
        }
        "producer" => {
            let d = Domain::attach(DOMAIN).unwrap();
            let q = ByteQueue::create(&d, &env("T18_QUEUE"), 4 << 20).unwrap();
            let mut tx = q.sender().unwrap();
            println!("READY");
            let _ = wait_stdin_line();
            let mut m = payload(size, 0);
            for seq in 1..=n {
                m[..8].copy_from_slice(&seq.to_le_bytes());
                tx.send(&m).unwrap();
            }
            let _ = wait_stdin_line();
        }
        "consumer" => {
            let d = Domain::attach(DOMAIN).unwrap();
            let (q, _) = ByteQueue::create_or_open(&d, &env("T18_QUEUE"), 4 << 20).unwrap();
            let mut rx = q.receiver().unwrap();
            println!("READY");
            drop(rx.recv().unwrap());
            let t = Instant::now();
            for _ in 1..n {
                drop(rx.recv_timeout(Duration::from_secs(60)).unwrap());
            }
            report(n - 1, size as u64, t.elapsed());
        }
        "tcp_server" => {
            let l = std::net::TcpListener::bind(format!("{}:7500", addr('b'))).unwrap();
            println!("READY");
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let total = n * size as u64;
            let mut got = s.read(&mut buf).unwrap() as u64;
            let t = Instant::now();
            let first = got;
            while got < total {
                let r = s.read(&mut buf).unwrap();
                assert!(r > 0, "tcp: the stream ended early");
                got += r as u64;
            }
            report((total - first) / size as u64, size as u64, t.elapsed());
        }
        "tcp_client" => {
            let s = std::net::TcpStream::connect(format!("{}:7500", addr('b'))).unwrap();
            let mut w = std::io::BufWriter::with_capacity(64 * 1024, s);
            let mut m = payload(size, 0);
            for seq in 1..=n {
                m[..8].copy_from_slice(&seq.to_le_bytes());
                w.write_all(&m).unwrap();
            }
            w.flush().unwrap();
            let _ = wait_stdin_line();
        }
        "zsub" => {
            let s = zenoh::open(zconfig(&format!("tcp/{}:7447", addr('b')), None)).wait().unwrap();
            let count = Arc::new(AtomicU64::new(0));
            let (tx, rx) = std::sync::mpsc::channel::<Instant>();
            let c = count.clone();
            let first = std::sync::Mutex::new(None::<Instant>);
            let _sub = s
                .declare_subscriber("bench/raw")
                .callback(move |sample| {
                    let k = c.fetch_add(1, Ordering::Relaxed);
                    if k == 0 {
                        *first.lock().unwrap() = Some(Instant::now());
                    }
                    let b = sample.payload().to_bytes();
                    if u64::from_le_bytes(b[..8].try_into().unwrap()) == n {
                        let _ = tx.send(first.lock().unwrap().unwrap());
                    }
                })
                .wait()
                .unwrap();
            println!("READY");
            let t = rx.recv_timeout(Duration::from_secs(120)).expect("zenoh: the last message never came");
            report(count.load(Ordering::Relaxed) - 1, size as u64, t.elapsed());
        }
        "zpub" => {
            let s = zenoh::open(zconfig(&format!("tcp/{}:7447", addr('a')), Some(&format!("tcp/{}:7447", addr('b')))))
                .wait()
                .unwrap();
            let p = s.declare_publisher("bench/raw").congestion_control(CongestionControl::Block).wait().unwrap();
            // Let the subscription reach us.
            std::thread::sleep(Duration::from_secs(1));
            let mut m = payload(size, 0);
            for seq in 1..=n {
                m[..8].copy_from_slice(&seq.to_le_bytes());
                p.put(m.clone()).wait().unwrap();
            }
            let _ = wait_stdin_line();
        }
        // Round trips: ping (A to B) and pong (B to A), each through its own tunnel.
        "pinger" => {
            let d = Domain::attach(DOMAIN).unwrap();
            let ping = ByteQueue::create(&d, "ping", 1 << 20).unwrap();
            let (pong, _) = ByteQueue::create_or_open(&d, "pong", 1 << 20).unwrap();
            let mut tx = ping.sender().unwrap();
            let mut rx = pong.receiver().unwrap();
            let mut rtts = Vec::new();
            let m = payload(64, 0);
            for i in 0..n + 500 {
                let t = Instant::now();
                tx.send(&m).unwrap();
                drop(rx.recv_timeout(Duration::from_secs(30)).unwrap());
                if i >= 500 {
                    rtts.push(t.elapsed());
                }
            }
            rtts.sort();
            let q = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
            println!("RTT {} {}", q(0.5), q(0.99));
        }
        "echo" => {
            let d = Domain::attach(DOMAIN).unwrap();
            let (ping, _) = ByteQueue::create_or_open(&d, "ping", 1 << 20).unwrap();
            let pong = ByteQueue::create(&d, "pong", 1 << 20).unwrap();
            let mut rx = ping.receiver().unwrap();
            let mut tx = pong.sender().unwrap();
            println!("READY");
            loop {
                let m = rx.recv().unwrap();
                tx.send(&m).unwrap();
            }
        }
        "zping" | "zpong" => {
            let me = if role == "zping" { 'a' } else { 'b' };
            let connect = (role == "zping").then(|| format!("tcp/{}:7449", addr('b')));
            let s = zenoh::open(zconfig(&format!("tcp/{}:7449", addr(me)), connect.as_deref())).wait().unwrap();
            let (out, inp) = if role == "zping" { ("bench/ping", "bench/pong") } else { ("bench/pong", "bench/ping") };
            let p = s.declare_publisher(out).congestion_control(CongestionControl::Block).wait().unwrap();
            let sub = s.declare_subscriber(inp).wait().unwrap();
            if role == "zpong" {
                println!("READY");
                while let Ok(sample) = sub.recv() {
                    p.put(sample.payload().clone()).wait().unwrap();
                }
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
            let m = payload(64, 0);
            let mut rtts = Vec::new();
            let mut i = 0;
            while rtts.len() < n as usize {
                let t = Instant::now();
                p.put(m.clone()).wait().unwrap();
                if sub.recv_timeout(Duration::from_secs(1)).unwrap().is_none() {
                    continue; // not connected yet
                }
                i += 1;
                if i > 500 {
                    rtts.push(t.elapsed());
                }
            }
            rtts.sort();
            let q = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
            println!("RTT {} {}", q(0.5), q(0.99));
        }
        other => panic!("unknown role {other}"),
    }
}

fn wait_stdin_line() -> String {
    let mut l = String::new();
    let _ = std::io::stdin().lock().read_line(&mut l);
    l
}

struct Run<'h> {
    hosts: &'h Hosts,
    kids: Vec<Child>,
}

impl Run<'_> {
    fn spawn(&mut self, host: &Host, role: &str, env: &[(&str, String)]) -> usize {
        self.kids.push(self.hosts.spawn(host, "bench", role, env));
        self.kids.len() - 1
    }

    fn line(&mut self, i: usize, want: &str) -> String {
        let mut out = BufReader::new(self.kids[i].stdout.take().unwrap());
        let l = wait_for_line(&mut out, want, Duration::from_secs(180));
        self.kids[i].stdout = None;
        l
    }

    fn tell(&mut self, i: usize) {
        let _ = self.kids[i].stdin.as_mut().unwrap().write_all(b"go\n");
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        for k in &mut self.kids {
            kill9(k);
        }
        for h in [&self.hosts.a, &self.hosts.b] {
            // Fresh shm per measurement.
            let _ = std::fs::remove_dir_all(&h.shm);
            std::fs::create_dir_all(&h.shm).unwrap();
        }
    }
}

fn nums(l: &str) -> Vec<f64> {
    l.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect()
}

fn tunnel(hosts: &Hosts, n: u64, size: u64) -> Vec<f64> {
    let mut r = Run { hosts, kids: Vec::new() };
    let e = |extra: &[(&'static str, String)]| {
        let mut v = vec![("T18_N", n.to_string()), ("T18_SIZE", size.to_string()), ("T18_QUEUE", "stream".to_owned())];
        v.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        v
    };
    let (a, b) = (&hosts.a, &hosts.b);
    let c = r.spawn(b, "consumer", &e(&[]));
    let p = r.spawn(a, "producer", &e(&[]));
    let l_a = format!("tcp/{}:7447", a.addr);
    r.spawn(a, "exporter", &e(&[("T18_LISTEN", l_a.clone())]));
    r.spawn(b, "importer", &e(&[("T18_LISTEN", format!("tcp/{}:7448", b.addr)), ("T18_CONNECT", l_a)]));
    let mut cout = BufReader::new(r.kids[c].stdout.take().unwrap());
    wait_for_line(&mut cout, "READY", Duration::from_secs(20));
    r.line(p, "READY");
    r.tell(p);
    nums(&wait_for_line(&mut cout, "RATE", Duration::from_secs(180)))
}

fn pair(hosts: &Hosts, n: u64, size: u64, server: &str, client: &str) -> Vec<f64> {
    let mut r = Run { hosts, kids: Vec::new() };
    let e = [("T18_N", n.to_string()), ("T18_SIZE", size.to_string())];
    let s = r.spawn(&hosts.b, server, &e);
    let mut sout = BufReader::new(r.kids[s].stdout.take().unwrap());
    wait_for_line(&mut sout, "READY", Duration::from_secs(20));
    r.spawn(&hosts.a, client, &e);
    nums(&wait_for_line(&mut sout, "RATE", Duration::from_secs(180)))
}

fn round_trips(hosts: &Hosts, n: u64) -> Vec<f64> {
    let mut r = Run { hosts, kids: Vec::new() };
    let (a, b) = (&hosts.a, &hosts.b);
    let e = |extra: &[(&'static str, &str)]| {
        let mut v = vec![("T18_N", n.to_string()), ("T18_SIZE", "64".to_owned())];
        v.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        v
    };
    let (la, lb) = (format!("tcp/{}:7447", a.addr), format!("tcp/{}:7448", b.addr));
    let echo = r.spawn(b, "echo", &e(&[]));
    r.line(echo, "READY");
    r.spawn(a, "exporter", &e(&[("T18_QUEUE", "ping"), ("T18_LISTEN", &la)]));
    r.spawn(b, "importer", &e(&[("T18_QUEUE", "ping"), ("T18_LISTEN", &lb), ("T18_CONNECT", &la)]));
    r.spawn(b, "exporter", &e(&[("T18_QUEUE", "pong"), ("T18_LISTEN", &format!("tcp/{}:7450", b.addr))]));
    let la2 = format!("tcp/{}:7451", a.addr);
    let lb2 = format!("tcp/{}:7450", b.addr);
    r.spawn(a, "importer", &e(&[("T18_QUEUE", "pong"), ("T18_LISTEN", &la2), ("T18_CONNECT", &lb2)]));
    let p = r.spawn(a, "pinger", &e(&[]));
    nums(&r.line(p, "RTT"))
}

fn zenoh_round_trips(hosts: &Hosts, n: u64) -> Vec<f64> {
    let mut r = Run { hosts, kids: Vec::new() };
    let e = [("T18_N", n.to_string()), ("T18_SIZE", "64".to_owned())];
    let s = r.spawn(&hosts.b, "zpong", &e);
    r.line(s, "READY");
    let p = r.spawn(&hosts.a, "zping", &e);
    nums(&r.line(p, "RTT"))
}

fn main() {
    if let Some(r) = role() {
        child(&r);
        return;
    }
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` runs nothing here.
    }
    let hosts = match Hosts::make("b") {
        Ok(mut h) => {
            h.capture = false;
            h
        }
        Err(why) => {
            println!("skipped: cannot make two network namespaces: {why}");
            return;
        }
    };
    let n64 = std::env::var("T18_BENCH_N64").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000u64);
    let n4k = std::env::var("T18_BENCH_N4K").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000u64);
    // Runs per measurement (the median is reported) and which parts to run: sizes (`64`,
    // `4096`) and `rtt`, comma separated (default: all).
    let reps = std::env::var("T18_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3usize).max(1);
    let only = std::env::var("T18_BENCH_ONLY").unwrap_or_else(|_| "64,4096,rtt".into());
    let wanted = |w: &str| only.split(',').any(|x| x.trim() == w);
    println!("two namespaces over a veth pair; rates measured by the receiver; median of {reps} runs\n");
    let median = |mut v: Vec<Vec<f64>>| {
        v.sort_by(|a, b| a[0].total_cmp(&b[0]));
        v[v.len() / 2].clone()
    };
    for (size, n) in [(64u64, n64), (4096, n4k)] {
        if !wanted(&size.to_string()) {
            continue;
        }
        let (mut ts, mut zs, mut cs) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            // Interleaved, so that a busy moment of the machine hits all three alike.
            let t = tunnel(&hosts, n, size);
            let z = pair(&hosts, n, size, "zsub", "zpub");
            let c = pair(&hosts, n, size, "tcp_server", "tcp_client");
            println!(
                "{size:>5} B  run {rep}: tunnel {:>10.0} msg/s, zenoh {:>10.0} msg/s, TCP {:>10.0} msg/s: tunnel / zenoh = {:.2}, tunnel / TCP = {:.2}",
                t[0],
                z[0],
                c[0],
                t[0] / z[0],
                t[0] / c[0]
            );
            ts.push(t);
            zs.push(z);
            cs.push(c);
        }
        let ratios = |r: &[Vec<f64>]| {
            let mut v: Vec<f64> = ts.iter().zip(r).map(|(t, x)| t[0] / x[0]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (rz, rc) = (ratios(&zs), ratios(&cs));
        let (t, z, c) = (median(ts), median(zs), median(cs));
        let line = |name: &str, v: &[f64]| {
            println!("{size:>5} B  {name:<22} {:>12.0} msg/s {:>9.1} MB/s (median)", v[0], v[1] / 1e6);
        };
        line("tunnel (acked)", &t);
        line("zenoh pub/sub, direct", &z);
        line("TCP stream, batched", &c);
        println!("{size:>5} B  median of the per-run ratios: tunnel / zenoh = {rz:.2}, tunnel / TCP = {rc:.2}\n");
    }
    if !wanted("rtt") {
        return;
    }
    let rt = round_trips(&hosts, 5000);
    let zr = zenoh_round_trips(&hosts, 5000);
    println!("64 B round trip A->B->A through two tunnels: median {:.0} us, p99 {:.0} us", rt[0], rt[1]);
    println!("64 B round trip A->B->A, zenoh pub/sub direct: median {:.0} us, p99 {:.0} us", zr[0], zr[1]);
    println!("added by the tunnels: median {:.0} us", rt[0] - zr[0]);
}
