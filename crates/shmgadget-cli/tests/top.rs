//! `shmgadget top`: `--once` against a domain with a live producer and consumer (rates,
//! peers alive, then dead after `kill -9`), and the terminal view captured from tmux.

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shmgadget::Domain;
use shmgadget::heap::Heap;
use shmgadget::queue::ByteQueue;

const TEST: &str = "top_once_shows_rates_and_live_peers_then_dead_peers_after_kill_9";

fn shmgadget(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shmgadget")).args(args).env_remove("SHMGADGET_DOMAIN").output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Children killed and the domain removed on drop (a failing test leaves nothing behind).
struct Cleanup(String, Vec<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = shmgadget(&["domain", "rm", &self.0, "--force"]);
    }
}

/// The producer: holds mutex "guard" of heap "objs", allocates and frees in it, and sends on
/// queue "q" until killed. The consumer: receives from "q" until killed.
fn role(role: &str, domain: &str) {
    let d = Domain::attach(domain).unwrap();
    if role == "producer" {
        let heap = Heap::create_or_open(&d, "objs", 4 << 20).unwrap().0;
        let (m, _) = heap.find_or_init_mutex("guard", || 0u64).unwrap();
        let _held = m.lock().unwrap();
        let q = ByteQueue::create_or_open(&d, "q", 64 << 10).unwrap().0;
        let mut tx = q.sender().unwrap();
        println!("READY");
        // Large enough to bypass the per-thread block caches, so the heap counts each one.
        let layout = std::alloc::Layout::from_size_align(128 << 10, 8).unwrap();
        loop {
            let _ = tx.send_timeout(b"hello", Duration::from_millis(100));
            let p = heap.alloc(layout).unwrap();
            // SAFETY: allocated just above from this heap, freed once.
            unsafe { heap.free(p).unwrap() };
            std::thread::sleep(Duration::from_micros(200));
        }
    } else {
        let q = ByteQueue::open(&d, "q").unwrap();
        let mut rx = q.receiver().unwrap();
        println!("READY");
        loop {
            let _ = rx.recv_timeout(Duration::from_millis(100)).map(|m| m.len());
        }
    }
}

/// Starts `role` in a child and waits (at most 30 s) for its READY line.
fn start(test: &str, role: &str, domain: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("SHMG_TOP_ROLE", role)
        .env("SHMG_TOP_DOMAIN", domain)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains("READY") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("the {role} never got ready"));
    child
}

fn top_json(domain: &str) -> serde_json::Value {
    let o = shmgadget(&["--domain", domain, "top", "--once", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)))
}

fn find<'a>(list: &'a serde_json::Value, key: &str, value: &str) -> &'a serde_json::Value {
    list.as_array().unwrap().iter().find(|e| e[key] == value).unwrap_or_else(|| panic!("no {key} {value}: {list}"))
}

#[test]
fn top_once_shows_rates_and_live_peers_then_dead_peers_after_kill_9() {
    if let (Ok(r), Ok(d)) = (std::env::var("SHMG_TOP_ROLE"), std::env::var("SHMG_TOP_DOMAIN")) {
        return role(&r, &d);
    }
    let domain = format!("top-{}", std::process::id());
    let mut guard = Cleanup(domain.clone(), Vec::new());
    let producer = start(TEST, "producer", &domain);
    let (p_pid, c_pid);
    p_pid = producer.id();
    guard.1.push(producer);
    let consumer = start(TEST, "consumer", &domain);
    c_pid = consumer.id();
    guard.1.push(consumer);

    let v = top_json(&domain);
    let q = find(&v["queues"], "name", "q");
    assert!(q["sent_per_s"].as_f64().unwrap() > 0.0, "messages flow in: {q}");
    assert!(q["received_per_s"].as_f64().unwrap() > 0.0, "messages flow out: {q}");
    assert_eq!((q["senders"][0]["pid"].as_u64(), q["senders"][0]["alive"].as_bool()), (Some(p_pid.into()), Some(true)));
    assert_eq!(
        (q["receivers"][0]["pid"].as_u64(), q["receivers"][0]["alive"].as_bool()),
        (Some(c_pid.into()), Some(true))
    );
    let h = find(&v["heaps"], "name", "objs");
    assert!(h["allocs_per_s"].as_f64().unwrap() > 0.0, "the producer allocates: {h}");
    let m = find(&v["sync_objects"], "name", "guard");
    assert_eq!((m["holder_pid"].as_u64(), m["holder_alive"].as_bool()), (Some(p_pid.into()), Some(true)), "{m}");
    for pid in [p_pid, c_pid] {
        let p = v["processes"].as_array().unwrap().iter().find(|p| p["pid"] == pid).unwrap();
        assert_eq!(p["alive"], true, "{p}");
        assert!(p["command"].is_string(), "{p}");
    }
    // The text frame has every table and column.
    let o = shmgadget(&["--domain", &domain, "top", "--once"]);
    let t = String::from_utf8_lossy(&o.stdout);
    for col in ["PROCESSES", "COMMAND", "RESIDENT", "ALLOCS/S", "IN/S", "OUT/S", "BLOCKED", "HOLDER", "WAITERS"] {
        assert!(t.contains(col), "no {col} in\n{t}");
    }
    assert!(t.contains(&format!("{p_pid} alive")), "{t}");

    for c in &mut guard.1 {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let v = top_json(&domain);
    let q = find(&v["queues"], "name", "q");
    assert_eq!(q["senders"][0]["alive"], false, "{q}");
    assert_eq!(q["receivers"][0]["alive"], false, "{q}");
    assert_eq!(q["sent_per_s"], 0.0, "{q}");
    let m = find(&v["sync_objects"], "name", "guard");
    assert_eq!((m["holder_pid"].as_u64(), m["holder_alive"].as_bool()), (Some(p_pid.into()), Some(false)), "{m}");
    // A dead attachment is shown dead, or already cleared (attaching, as top does, reaps them).
    for pid in [p_pid, c_pid] {
        let live = v["processes"].as_array().unwrap().iter().any(|p| p["pid"] == pid && p["alive"] == true);
        assert!(!live, "pid {pid} is dead: {}", v["processes"]);
    }
    let o = shmgadget(&["--domain", &domain, "top", "--once"]);
    let t = String::from_utf8_lossy(&o.stdout);
    let queue_line =
        t.lines().find(|l| l.starts_with("q ") && l.contains(" bytes ")).unwrap_or_else(|| panic!("{}", text(&o)));
    assert_eq!(queue_line.matches(" DEAD").count(), 2, "both peers shown dead: {}", text(&o));
}

/// `tmux` on a private server, killed on drop.
struct Tmux(String);

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux").args(["-L", &self.0]).args(args).output().unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_in_a_terminal_shows_every_table_with_its_columns_and_quits_on_q() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped: tmux is not installed (apt-get install tmux)");
        return;
    }
    let domain = format!("toptty-{}", std::process::id());
    let _guard = Cleanup(domain.clone(), Vec::new());
    for (name, kind, size) in [("h", "heap", "1M"), ("q", "queue", "64K"), ("r", "raw", "4K")] {
        let o = shmgadget(&["--domain", &domain, "create", name, "--size", size, "--kind", kind]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let tmux = Tmux(format!("sgtest-{}", std::process::id()));
    let command = format!("exec {} --domain {domain} top", env!("CARGO_BIN_EXE_shmgadget"));
    let o = tmux.cmd(&["new-session", "-d", "-s", "top", "-x", "150", "-y", "50", &command]);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(20);
    let screen = loop {
        let o = tmux.cmd(&["capture-pane", "-p", "-t", "top"]);
        let screen = String::from_utf8_lossy(&o.stdout).into_owned();
        if screen.contains("SYNC OBJECTS") && screen.contains("(this top)") {
            break screen;
        }
        assert!(Instant::now() < deadline, "top never drew its tables; the pane shows:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for col in [
        "PROCESSES",
        "PID",
        "COMMAND",
        "STATE",
        "SECTIONS",
        "RESERVED",
        "COMMITTED",
        "RESIDENT",
        "HEAPS",
        "USED",
        "FREE",
        "FRAG",
        "ALLOCS/S",
        "FREES/S",
        "QUEUES",
        "FILL",
        "IN/S",
        "OUT/S",
        "SENDERS",
        "RECEIVERS",
        "BLOCKED",
        "SYNC OBJECTS",
        "HOLDER",
        "WAITERS",
        "(this top)",
        "q quits",
    ] {
        assert!(screen.contains(col), "no {col:?} on the screen:\n{screen}");
    }
    let o = tmux.cmd(&["send-keys", "-t", "top", "q"]);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.cmd(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < deadline, "top did not quit on q");
        std::thread::sleep(Duration::from_millis(100));
    }
}
