//! Helpers for multi-process tests.
//!
//! A test that needs other processes re-executes this test binary with `--exact <test name>`
//! and the role in `SHMG_TEST_ROLE`; the same test function sees the role and plays it
//! instead of orchestrating. Children report to the parent with `KEY=value` lines on stdout.
//! Every blocking wait has a watchdog.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shmgadget::DomainOptions;

pub const ROLE: &str = "SHMG_TEST_ROLE";
pub const DOMAIN: &str = "SHMG_TEST_DOMAIN";

/// The role this process plays, if it is a child. A child dies with its parent (so a failed
/// test never leaves processes behind) and after five minutes at the latest.
pub fn role() -> Option<String> {
    let role = std::env::var(ROLE).ok()?;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl(PR_SET_PDEATHSIG) with a valid signal number has no memory effects.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(300));
            eprintln!("test child: watchdog expired, exiting");
            std::process::exit(3);
        });
    });
    Some(role)
}

/// The domain the parent chose, in a child.
pub fn child_domain() -> String {
    std::env::var(DOMAIN).expect("child started without a domain")
}

/// A domain name unique to this test and process.
pub fn unique_domain(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("t-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Small windows so parallel tests do not claim terabytes each.
pub fn small(window: u64) -> DomainOptions {
    DomainOptions { window_size: window, ..Default::default() }
}

/// Starts this test binary as a child playing `role` in test `test`.
pub fn spawn(test: &str, role: &str, domain: &str, extra_env: &[(&str, String)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE, role)
        .env(DOMAIN, domain)
        .envs(extra_env.iter().map(|(k, v)| (*k, v.clone())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot spawn the test binary")
}

/// Waits for a child with a watchdog; kills it and panics after `limit`.
pub fn wait(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {} did not finish within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a child to completion and returns its `KEY=value` report; panics if it failed.
pub fn run(test: &str, role: &str, domain: &str, extra_env: &[(&str, String)]) -> HashMap<String, String> {
    let mut child = spawn(test, role, domain, extra_env);
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || parse_report(BufReader::new(stdout)));
    let status = wait(&mut child, Duration::from_secs(60));
    let report = reader.join().unwrap();
    assert!(status.success(), "child role {role} failed: {status}; report {report:?}");
    report
}

fn parse_report(r: impl BufRead) -> HashMap<String, String> {
    r.lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect()
}

/// Reads lines from a running child until one equals `want` (watchdog: 30 s).
pub fn wait_for_line(child: &mut Child, want: &str) {
    let stdout = child.stdout.take().unwrap();
    let want = want.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(l)) = lines.next() {
            if l.trim() == want {
                let _ = tx.send(());
                // Keep draining so the child never blocks on a full pipe.
                for _ in lines.by_ref() {}
                return;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("child never reported readiness");
}

/// `kill -9`, then reap. Panics if the child had already died some other way (a panic in a
/// victim must not go unnoticed just because it was about to be killed anyway).
pub fn kill9(child: &mut Child) {
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: plain kill(2) on a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "child {} had already exited: {status}", child.id());
}

/// Backing objects of `domain` still in the shm directory.
pub fn leftovers(domain: &str) -> Vec<String> {
    let dir = std::env::var("SHMGADGET_SHM_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let prefix = format!("shmgadget.{domain}:");
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)).collect()
        })
        .unwrap_or_default()
}

/// Asserts the domain left nothing behind.
pub fn assert_clean(domain: &str) {
    let left = leftovers(domain);
    assert!(left.is_empty(), "domain {domain} left objects behind: {left:?}");
}

/// The path of one of `domain`'s objects.
pub fn object_path(file: &str) -> String {
    let dir = std::env::var("SHMGADGET_SHM_DIR").unwrap_or_else(|_| "/dev/shm".into());
    format!("{dir}/{file}")
}

/// A small tmpfs mounted for one test, unmounted (and its directory removed) when dropped,
/// also when the test panics: a filesystem that fills up, for out-of-space paths.
pub struct Tmpfs {
    pub path: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs with mount `options` (`size=4m,nr_inodes=64`, ...) on a fresh directory
    /// named after `tag`. `None`, after printing why the test is skipped, when this process is
    /// not root or the mount fails (a container without `CAP_SYS_ADMIN`).
    pub fn mount(tag: &str, options: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        let path = std::env::temp_dir().join(format!("shmg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, &format!("shmg-{tag}")])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&path);
            eprintln!("skipped: could not mount a tmpfs (no CAP_SYS_ADMIN in this container?)");
            return None;
        }
        Some(Tmpfs { path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Runs this test binary as a child playing `role` in `domain`, with its environment adjusted by
/// `setup`, and returns its exit status, stdout and stderr (for children expected to die, or
/// whose messages the test reads). The watchdog of [`wait`] applies.
pub fn run_capturing(
    test: &str,
    role: &str,
    domain: &str,
    setup: impl FnOnce(&mut Command),
) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE, role)
        .env(DOMAIN, domain)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    setup(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || std::io::read_to_string(out).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    let status = wait(&mut child, Duration::from_secs(60));
    (status, out.join().unwrap(), err.join().unwrap())
}
