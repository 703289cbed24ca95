//! Helpers for multi-process tests on Linux. The process protocol (re-executing this test
//! binary as a child playing a role, `KEY=value` reports, watchdogs) is `process.rs`, shared
//! with the Windows tests (`tests/win/`).

#![allow(dead_code)]

use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

mod process;
pub use process::*;

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

/// A domain name unique to this test and process.
pub fn unique_domain(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("t-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
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
