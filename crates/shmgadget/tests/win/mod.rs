//! Helpers for the Windows multi-process tests (run under Wine in CI, `.ci/windows`). The
//! process protocol (re-executing this test binary as a child playing a role, `KEY=value`
//! reports, watchdogs) is `tests/common/process.rs`, shared with the Linux tests.

#![allow(dead_code)]

use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[path = "../common/process.rs"]
mod process;
pub use process::*;

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

/// A domain name unique to this test and process. Wine numbers processes from 32 again with
/// every new wineserver, so the pid alone would repeat between runs: the clock is added.
pub fn unique_domain(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("w-{tag}-{}-{:x}-{}", std::process::id(), now.as_micros() % 0xff_ffff, N.fetch_add(1, Ordering::Relaxed))
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

pub fn addr_env() -> usize {
    let s = std::env::var("ADDR").unwrap();
    usize::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}
