//! Never map what a stranger can shrink: a second user (uid 65534) shrinks and regrows its own
//! registry in a loop while root lists domains and creates new ones (which reads every
//! registry to choose a window), 200 times, with zero crashes. Needs root; skipped otherwise.

mod common;

use common::cli;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65534;

struct Cleanup(PathBuf, Option<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Not a test of its own: the stranger's loop (runs as uid 65534 until killed).
#[test]
fn shrinker_role() {
    let Ok(path) = std::env::var("SHMGADGET_SHRINK") else { return };
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut orig = vec![0u8; len as usize];
    f.read_exact_at(&mut orig, 0).unwrap();
    println!("shrinking");
    for i in 0u64.. {
        f.set_len(if i % 2 == 0 { 0 } else { 4096 }).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&orig[..4096], 0).unwrap();
        if i % 64 == 0 {
            f.write_all_at(&orig, 0).unwrap();
        }
    }
}

#[test]
fn a_stranger_shrinking_its_registry_never_crashes_roots_listing_or_domain_creation() {
    if std::env::var_os("SHMGADGET_SHRINK").is_some() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        eprintln!("skipped: acting as a second user needs root");
        return;
    }
    let dir = PathBuf::from(format!("/dev/shm/sgtest-stranger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut guard = Cleanup(dir.clone(), None);
    // The stranger's domain, made as that user.
    let out = cli(&dir, "stranger", &["create", "s", "--size", "4K"]).uid(NOBODY).gid(NOBODY).output().unwrap();
    assert!(out.status.success(), "{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let reg = dir.join("shmgadget.stranger:registry");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "shrinker_role", "--nocapture", "--test-threads=1"])
        .env("SHMGADGET_SHRINK", &reg)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open (the harness may still print) until the child is killed.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert_ne!(std::io::BufRead::read_line(&mut out, &mut line).unwrap(), 0, "the stranger's loop did not start");
        if line.contains("shrinking") {
            break;
        }
    }
    guard.1 = Some(child);
    let mut crashes = Vec::new();
    let signal = |out: &std::process::Output| out.status.signal();
    for i in 0..200 {
        let out = cli(&dir, "x", &["domains"]).output().unwrap();
        if let Some(sig) = signal(&out) {
            crashes.push(format!("domains #{i}: signal {sig}"));
        }
        let domain = format!("root{i}");
        let out = cli(&dir, &domain, &["create", "s", "--size", "4K"]).output().unwrap();
        if let Some(sig) = signal(&out) {
            crashes.push(format!("create #{i}: signal {sig}"));
        } else {
            assert!(out.status.success(), "create #{i}: {}", String::from_utf8_lossy(&out.stderr));
            let out = cli(&dir, &domain, &["rm", "s"]).output().unwrap();
            assert!(out.status.success(), "rm #{i}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let stranger_alive = guard.1.as_mut().unwrap().try_wait().unwrap().is_none();
    assert!(stranger_alive, "the stranger's loop stopped early");
    std::thread::sleep(Duration::from_millis(1));
    assert!(crashes.is_empty(), "{} crashes:\n{}", crashes.len(), crashes.join("\n"));
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
