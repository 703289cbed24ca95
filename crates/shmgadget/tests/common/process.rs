//! Process helpers of the multi-process tests, shared by `tests/common/` (Linux) and
//! `tests/win/` (Windows, under Wine): a test that needs other processes re-executes this test
//! binary with `--exact <test name>` and the role in `SHMG_TEST_ROLE`; the same test function
//! sees the role and plays it instead of orchestrating. Children report to the parent with
//! `KEY=value` lines on stdout. Every blocking wait has a watchdog.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use shmgadget::DomainOptions;

pub const ROLE: &str = "SHMG_TEST_ROLE";
pub const DOMAIN: &str = "SHMG_TEST_DOMAIN";

/// How long [`run`] lets a child run (Wine starts processes and makes system calls slowly).
const CHILD_LIMIT: Duration = Duration::from_secs(if cfg!(windows) { 120 } else { 60 });

/// The domain the parent chose, in a child.
pub fn child_domain() -> String {
    std::env::var(DOMAIN).expect("child started without a domain")
}

/// Small windows so parallel tests do not claim terabytes each (and so Wine, which reserves
/// them piece by piece in every process, stays quick).
pub fn small(window: u64) -> DomainOptions {
    DomainOptions { window_size: window, ..Default::default() }
}

/// The arguments that make this test binary run test `test` alone, as a child (ignored tests
/// included: a child of an `--ignored` run plays its role too).
fn child_args(test: &str) -> [&str; 6] {
    [test, "--exact", "--include-ignored", "--nocapture", "--test-threads=1", "-q"]
}

/// Starts this test binary as a child playing `role` in test `test`.
pub fn spawn(test: &str, role: &str, domain: &str, extra_env: &[(&str, String)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(child_args(test))
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
    let status = wait(&mut child, CHILD_LIMIT);
    let report = reader.join().unwrap();
    assert!(status.success(), "child role {role} failed: {status}; report {report:?}");
    report
}

/// The `KEY=value` lines of a child's output.
pub fn parse_report(r: impl BufRead) -> HashMap<String, String> {
    r.lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect()
}

/// Reads lines from a running child until one equals `want` (watchdog: 60 s); the rest of its
/// stdout is drained in the background, so the child never blocks on a full pipe.
pub fn wait_for_line(child: &mut Child, want: &str) {
    let stdout = child.stdout.take().unwrap();
    let want = want.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(l)) = lines.next() {
            if l.trim() == want {
                let _ = tx.send(());
                for _ in lines.by_ref() {}
                return;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("child never reported readiness");
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
    cmd.args(child_args(test)).env(ROLE, role).env(DOMAIN, domain).stdout(Stdio::piped()).stderr(Stdio::piped());
    setup(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || std::io::read_to_string(out).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    let status = wait(&mut child, CHILD_LIMIT);
    (status, out.join().unwrap(), err.join().unwrap())
}

/// The shm directory the tests use: `SHMGADGET_SHM_DIR`, or the platform's default.
pub fn shm_dir() -> std::path::PathBuf {
    std::env::var_os("SHMGADGET_SHM_DIR").map(Into::into).unwrap_or_else(|| shmgadget::DEFAULT_SHM_DIR.into())
}

/// Backing objects of `domain` still in the shm directory (the `:` of object names is stored
/// as `~` on Windows).
pub fn leftovers(domain: &str) -> Vec<String> {
    let prefix = format!("shmgadget.{domain}{}", if cfg!(windows) { '~' } else { ':' });
    std::fs::read_dir(shm_dir())
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
