//! A heap lock word set by a stray write, through the C interface. A word that names no
//! thread at all (only the waiters bit) proves nothing about a holder: `shm_alloc` returns NULL
//! and `shm_heap_check` `SHM_ERR_CORRUPT` within 10 s (instead of waiting for ever), each naming
//! the lock; after `gc --force` both work again. A word that names a thread that does not exist
//! (as a holder killed between taking the word and recording itself leaves it), in a domain
//! whose processes all share our pid namespace, is a dead holder's: the next call takes the
//! lock over and recovers the heap. Every step runs in its own process.

mod common;

use std::ffi::{CStr, CString};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A heap's lock word: the control block's `RawMutex` at 128, its glibc mutex 32 bytes in.
const HEAP_LOCK_WORD: u64 = 128 + 32;
/// No such thread can exist (above any pid_max, inside the tid mask).
const ABSENT_TID: u32 = 0x3fff_fff0;
/// A word naming no thread: only the waiters bit.
const NO_THREAD: u32 = 0x8000_0000;

/// Whether the mounted `/proc` is this process's pid namespace's (`/proc/self` names our pid):
/// only then can thread ids be judged there, and a lock word naming a gone thread be taken over.
fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str()?.parse::<u32>().ok()) == Some(std::process::id())
}

struct ShmDir(PathBuf);

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs this test binary as `role` in `domain`, bounded by 10 s; returns its stdout.
fn role(dir: &ShmDir, domain: &str, role: &str) -> String {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "c_role", "--nocapture", "--test-threads=1"])
        .env("SHM_NT_LOCKS_ROLE", role)
        .env("SHMGADGET_DOMAIN", domain)
        .env("SHMGADGET_SHM_DIR", &dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = common::wait_bounded(&mut child, Duration::from_secs(10), &format!("role {role}"));
    let out = child.wait_with_output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        status.success() && status.signal().is_none(),
        "role {role}: {status:?}\n{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

fn last_error() -> String {
    // SAFETY: shm_last_error returns a valid NUL-terminated string owned by the library.
    unsafe { CStr::from_ptr(shm_nt::shm_last_error()) }.to_string_lossy().into_owned()
}

/// Not a test of its own: one step, in a child process.
#[test]
fn c_role() {
    let Ok(role) = std::env::var("SHM_NT_LOCKS_ROLE") else { return };
    let name = CString::new("h").unwrap();
    let mut hdl: usize = 0;
    let rc = shm_nt::shm_heap(name.as_ptr(), 1 << 20, &mut hdl, 0);
    match role.as_str() {
        "make" | "works" | "taken_over" => {
            assert!(rc >= 0, "shm_heap: {rc} {}", last_error());
            let p = shm_nt::shm_alloc(hdl, 1000);
            assert!(!p.is_null(), "shm_alloc: {}", last_error());
            assert_eq!(shm_nt::shm_free(p), shm_nt::SHM_OK, "{}", last_error());
            assert_eq!(shm_nt::shm_heap_check(hdl), shm_nt::SHM_OK, "{}", last_error());
        }
        "stuck" => {
            if rc >= 0 {
                let start = Instant::now();
                let p = shm_nt::shm_alloc(hdl, 1000);
                assert!(p.is_null(), "shm_alloc on a stuck lock returned memory");
                println!("alloc: {}", last_error());
                assert_eq!(shm_nt::shm_heap_check(hdl), shm_nt::SHM_ERR_CORRUPT, "{}", last_error());
                println!("check: {}", last_error());
                assert!(start.elapsed() < Duration::from_secs(8), "{:?}", start.elapsed());
            } else {
                println!("heap: {}", last_error());
            }
        }
        other => panic!("unknown role {other}"),
    }
    assert_eq!(shm_nt::shm_exit(), shm_nt::SHM_OK);
    println!("role done");
}

#[test]
fn a_stuck_heap_lock_is_taken_over_when_its_thread_is_gone_and_reported_until_gc_force_when_it_names_none() {
    if std::env::var_os("SHM_NT_LOCKS_ROLE").is_some() {
        return;
    }
    let dir = ShmDir(PathBuf::from(format!("/dev/shm/sgtest-cnt-locks-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir(&dir.0).unwrap();
    let domain = format!("cnt-locks-{}", std::process::id());
    assert!(role(&dir, &domain, "make").contains("role done"));
    let heap = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with(&format!("shmgadget.{domain}:")) && n.ends_with(":h"))
        .expect("the heap's object");
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(dir.0.join(&heap)).unwrap();
    // A thread that does not exist: taken over, the heap recovered.
    if proc_is_ours() {
        f.write_all_at(&ABSENT_TID.to_le_bytes(), HEAP_LOCK_WORD).unwrap();
        let so = role(&dir, &domain, "taken_over");
        assert!(so.contains("role done"), "{so}");
        let opts = shmgadget::DomainOptions { must_exist: true, shm_dir: Some(dir.0.clone()), ..Default::default() };
        let d = shmgadget::Domain::attach_with(&domain, &opts).unwrap();
        let recoveries = shmgadget::heap::Heap::open(&d, "h").unwrap().stats().unwrap().recoveries;
        assert_eq!(recoveries, 1, "the lock was taken over as a dead holder's");
        d.detach().unwrap();
    } else {
        eprintln!("taken over: skipped (the mounted /proc is not this pid namespace's)");
    }
    // No thread at all: reported, and left to `gc --force`.
    f.write_all_at(&NO_THREAD.to_le_bytes(), HEAP_LOCK_WORD).unwrap();
    let so = role(&dir, &domain, "stuck");
    assert!(so.contains("role done"), "{so}");
    assert!(
        so.contains("the lock of heap \"h\" is held by nobody") && so.contains("names no thread"),
        "the C calls name the lock and its holder: {so}"
    );
    let report = shmgadget::inspect::gc(Some(&domain), Some(&dir.0), true).unwrap();
    assert!(report.broken_locks.iter().any(|(_, w)| w.contains("heap")), "{report:?}");
    assert!(role(&dir, &domain, "works").contains("role done"));
}
