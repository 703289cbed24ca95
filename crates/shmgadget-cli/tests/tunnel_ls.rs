//! `shmgadget ls` and `top --once` show a running tunnel end (its key, what it forwarded, its
//! rate, what is in flight) and, after `kill -9`, show it dead rather than its last numbers.
#![cfg(feature = "tunnel")]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shmgadget::Domain;
use shmgadget::queue::ByteQueue;

fn shmgadget(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shmgadget")).args(args).env_remove("SHMGADGET_DOMAIN").output().unwrap()
}

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

fn ls_json(domain: &str) -> serde_json::Value {
    let o = shmgadget(&["--domain", domain, "--json", "ls"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn ls_and_top_show_a_running_tunnel_end_and_a_killed_one_as_dead() {
    let domain = format!("t-tunls-{}", std::process::id());
    let mut guard = Cleanup(domain.clone(), Vec::new());
    let d = Domain::attach(&domain).unwrap();
    let q = ByteQueue::create(&d, "out", 1 << 16).unwrap();
    let mut tx = q.sender().unwrap();
    for i in 0..10u64 {
        tx.send(&i.to_le_bytes()).unwrap();
    }
    // An exporter with no importer: it sends, nothing is acknowledged, all stays in flight.
    let port = 20000 + std::process::id() % 20000;
    let exporter = Command::new(env!("CARGO_BIN_EXE_shmgadget"))
        .args(["--domain", &domain, "tunnel", "export", "out", "--no-scouting", "--mode", "peer"])
        .args(["--listen", &format!("tcp/127.0.0.1:{port}"), "--key", "demo/out"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = exporter.id();
    guard.1.push(exporter);
    let t = Instant::now();
    let end = loop {
        let v = ls_json(&domain);
        let e = v["tunnels"].as_array().and_then(|a| a.first()).cloned();
        if let Some(e) = e.filter(|e| e["in_flight"] == 10) {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no live tunnel end in {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(end["section"], "out.tunnel-export");
    assert_eq!((end["end"].as_str(), end["key"].as_str()), (Some("export"), Some("demo/out")));
    assert_eq!((end["alive"].as_bool(), end["pid"].as_u64()), (Some(true), Some(pid as u64)));
    assert_eq!(end["forwarded"], 0);
    let text = String::from_utf8(shmgadget(&["--domain", &domain, "ls"]).stdout).unwrap();
    assert!(
        text.contains(&format!("tunnel out.tunnel-export (export, pid {pid}): key demo/out, 0 forwarded")),
        "{text}"
    );
    assert!(text.contains("10 in flight"), "{text}");
    let top = String::from_utf8(shmgadget(&["--domain", &domain, "top", "--once"]).stdout).unwrap();
    assert!(top.contains("TUNNELS") && top.contains("demo/out"), "{top}");

    // Killed: dead, no numbers.
    let mut exporter = guard.1.pop().unwrap();
    exporter.kill().unwrap();
    exporter.wait().unwrap();
    let v = ls_json(&domain);
    let e = &v["tunnels"][0];
    assert_eq!(
        (e["alive"].as_bool(), e["in_flight"].is_null(), e["forwarded"].is_null()),
        (Some(false), true, true),
        "{v}"
    );
    let text = String::from_utf8(shmgadget(&["--domain", &domain, "ls"]).stdout).unwrap();
    assert!(text.contains("tunnel out.tunnel-export (export): DEAD or stopped (key demo/out)"), "{text}");
    drop(tx);
    drop(q);
    d.detach().unwrap();
}
