//! Helpers for the Windows multi-process tests (run under Wine in CI, `.ci/windows`): the same
//! protocol as `tests/common/` on Linux. A test that needs other processes re-executes this
//! test binary with `--exact <test name>` and the role in `SHMG_TEST_ROLE`; children report
//! with `KEY=value` lines on stdout. Every blocking wait has a watchdog.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shmgadget::DomainOptions;

pub const ROLE: &str = "SHMG_TEST_ROLE";
pub const DOMAIN: &str = "SHMG_TEST_DOMAIN";

/// The role this process plays, if it is a child. A child exits after five minutes at the
/// latest (Windows has no parent-death signal; the parent kills its children on failure).
pub fn role() -> Option<String> {
    let role = std::env::var(ROLE).ok()?;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(300));
            eprintln!("test child: watchdog expired, exiting");
            std::process::exit(3);
        });
    });
    Some(role)
}

/// Whether this process runs under Wine (ntdll exports `wine_get_version` there).
pub fn under_wine() -> bool {
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleA, GetProcAddress};
    // SAFETY: NUL-terminated names; ntdll is loaded in every process.
    unsafe {
        let m = GetModuleHandleA(c"ntdll.dll".as_ptr().cast());
        !m.is_null() && GetProcAddress(m, c"wine_get_version".as_ptr().cast()).is_some()
    }
}

/// Prints why a test is skipped here (shown with `--nocapture`, and in CI's log).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// The domain the parent chose, in a child.
pub fn child_domain() -> String {
    std::env::var(DOMAIN).expect("child started without a domain")
}

/// A domain name unique to this test and process. Wine numbers processes from 32 again with
/// every new wineserver, so the pid alone would repeat between runs: the clock is added.
pub fn unique_domain(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("w-{tag}-{}-{:x}-{}", std::process::id(), now.as_micros() % 0xff_ffff, N.fetch_add(1, Ordering::Relaxed))
}

/// Small windows: Wine reserves them piece by piece in every process.
pub fn small(window: u64) -> DomainOptions {
    DomainOptions { window_size: window, ..Default::default() }
}

/// Starts this test binary as a child playing `role` in test `test`.
pub fn spawn(test: &str, role: &str, domain: &str, extra_env: &[(&str, String)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--include-ignored", "--nocapture", "--test-threads=1", "-q"])
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
    let status = wait(&mut child, Duration::from_secs(120));
    let report = reader.join().unwrap();
    assert!(status.success(), "child role {role} failed: {status}; report {report:?}");
    report
}

pub fn parse_report(r: impl BufRead) -> HashMap<String, String> {
    r.lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect()
}

/// Reads lines from a running child until one equals `want` (watchdog: 60 s); the rest of its
/// stdout is drained in the background.
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

/// `TerminateProcess` (what `Child::kill` does on Windows), then reap. Panics if the child had
/// already exited some other way.
pub fn terminate(child: &mut Child) {
    assert!(child.try_wait().unwrap().is_none(), "child {} had already exited", child.id());
    child.kill().unwrap();
    let status = child.wait().unwrap();
    // TerminateProcess with exit code 1 (std's choice).
    assert_eq!(status.code(), Some(1), "child {} exited on its own: {status}", child.id());
}

/// The shm directory the tests use.
pub fn shm_dir() -> std::path::PathBuf {
    std::env::var_os("SHMGADGET_SHM_DIR").map(Into::into).unwrap_or_else(|| shmgadget::DEFAULT_SHM_DIR.into())
}

/// Backing objects of `domain` still in the shm directory (`:` is stored as `~` on Windows).
pub fn leftovers(domain: &str) -> Vec<String> {
    let prefix = format!("shmgadget.{domain}~");
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

pub fn addr_env() -> usize {
    let s = std::env::var("ADDR").unwrap();
    usize::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}
