//! Two "hosts" on one machine: two network namespaces joined by a veth pair, each with its own
//! shm directory, so nothing is shared but the network. Processes are this test binary
//! re-executed with a role, run inside a namespace with `ip netns exec`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub const ROLE: &str = "T18_ROLE";

/// The role of this process, if it is a child. A child dies with its parent and after five
/// minutes at the latest.
pub fn role() -> Option<String> {
    let role = std::env::var(ROLE).ok()?;
    // SAFETY: prctl(PR_SET_PDEATHSIG) with a valid signal number has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(300));
        eprintln!("test child: watchdog expired, exiting");
        std::process::exit(3);
    });
    Some(role)
}

/// One host: a network namespace, its veth end's address, and an shm directory.
pub struct Host {
    pub ns: String,
    pub addr: String,
    pub shm: String,
}

/// Two hosts joined by a veth pair; removed (namespaces, veth, shm directories, the
/// children's stderr logs) on drop.
pub struct Hosts {
    pub a: Host,
    pub b: Host,
    /// Each child's stderr goes to a log file (role, path), shown by [`Hosts::dump_logs`];
    /// `false`: children write to ours.
    pub capture: bool,
    logs: std::sync::Mutex<Vec<(String, std::path::PathBuf)>>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Hosts {
    /// Makes the two hosts, or says why it cannot (not root, no `ip`).
    pub fn make(tag: &str) -> Result<Hosts, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: network namespaces need CAP_SYS_ADMIN".into());
        }
        let pid = std::process::id();
        let n = (pid % 200) + 20;
        let a = Host {
            ns: format!("sg{tag}a{pid}"),
            addr: format!("10.77.{n}.1"),
            shm: format!("/dev/shm/sgt-{tag}-{pid}-a"),
        };
        let b = Host {
            ns: format!("sg{tag}b{pid}"),
            addr: format!("10.77.{n}.2"),
            shm: format!("/dev/shm/sgt-{tag}-{pid}-b"),
        };
        let (va, vb) = (format!("v{tag}a{pid}"), format!("v{tag}b{pid}"));
        let hosts = Hosts { a, b, capture: true, logs: Default::default() };
        ip(&["netns", "add", &hosts.a.ns])?;
        ip(&["netns", "add", &hosts.b.ns])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &hosts.a.ns])?;
        ip(&["link", "set", &vb, "netns", &hosts.b.ns])?;
        for (h, v) in [(&hosts.a, &va), (&hosts.b, &vb)] {
            ip(&["-n", &h.ns, "addr", "add", &format!("{}/24", h.addr), "dev", v])?;
            ip(&["-n", &h.ns, "link", "set", v, "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
            std::fs::create_dir_all(&h.shm).map_err(|e| format!("cannot create {}: {e}", h.shm))?;
        }
        Ok(hosts)
    }

    /// Starts this test binary playing `role` of test `test` on `host`.
    pub fn spawn(&self, host: &Host, test: &str, role: &str, env: &[(&str, String)]) -> Child {
        let exe = std::env::current_exe().unwrap();
        let stderr = if self.capture {
            let mut logs = self.logs.lock().unwrap();
            let path = std::env::temp_dir().join(format!("{}-{}-{role}.log", host.ns, logs.len()));
            let file = std::fs::File::create(&path).expect("cannot create a child's log file");
            logs.push((format!("{role} on {}", host.ns), path));
            Stdio::from(file)
        } else {
            Stdio::inherit()
        };
        Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
            .env(ROLE, role)
            .env("SHMGADGET_SHM_DIR", &host.shm)
            .env("T18_ADDR_A", &self.a.addr)
            .env("T18_ADDR_B", &self.b.addr)
            .envs(env.iter().map(|(k, v)| (*k, v.clone())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("cannot spawn the test binary under ip netns exec")
    }
}

impl Hosts {
    /// Prints every child's stderr so far (on a failure).
    pub fn dump_logs(&self) {
        for (who, path) in self.logs.lock().unwrap().iter() {
            let text =
                std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
            eprintln!("---- stderr of {who} ----\n{}", text.trim_end());
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A test failing: what its children said.
            self.dump_logs();
        }
        for (_, path) in self.logs.lock().unwrap().drain(..) {
            let _ = std::fs::remove_file(path);
        }
        for h in [&self.a, &self.b] {
            // Deleting a namespace deletes its veth end, and the pair with it.
            let _ = ip(&["netns", "del", &h.ns]);
            let _ = std::fs::remove_dir_all(&h.shm);
        }
    }
}

/// Reads lines from a child until one starts with `want`, with a watchdog.
pub fn wait_for_line(out: &mut BufReader<ChildStdout>, want: &str, limit: Duration) -> String {
    let start = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("child exited before printing {want:?}");
        }
        if line.starts_with(want) {
            return line.trim().to_owned();
        }
        assert!(start.elapsed() < limit, "no {want:?} within {limit:?}");
    }
}

pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A small xorshift: random moments, reproducible from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
