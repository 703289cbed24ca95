//! Helpers shared by the CLI's tests: a private shm directory, the `shmgadget` binary run
//! against it, runs bounded in time, and the objects a domain has in the directory.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A private shm directory under /dev/shm, removed on drop with anything left in it.
pub struct ShmDir(pub PathBuf);

impl ShmDir {
    /// A directory only this user can write to.
    pub fn new(tag: &str) -> ShmDir {
        let p = PathBuf::from(format!("/dev/shm/sgtest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        ShmDir(p)
    }

    /// A directory every user can write to (sticky, world-writable like /dev/shm).
    pub fn shared(tag: &str) -> ShmDir {
        let d = ShmDir::new(tag);
        std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
        d
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `shmgadget` binary with `args`, on shm directory `dir`, no default domain.
pub fn shmgadget(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shmgadget"));
    c.args(args).env("SHMGADGET_SHM_DIR", dir).env_remove("SHMGADGET_DOMAIN");
    c
}

/// [`shmgadget`] on `domain`.
pub fn cli(dir: &Path, domain: &str, args: &[&str]) -> Command {
    let mut c = shmgadget(dir, &["--domain", domain]);
    c.args(args);
    c
}

/// Runs `cmd` with a 10 s bound; returns (exit code, stdout, stderr). Fails the test on a
/// signal, a panic or a timeout.
pub fn run_bounded(mut cmd: Command, what: &str) -> (i32, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = child.wait_with_output().unwrap();
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(status.signal().is_none(), "{what}: killed by signal {:?}\n{se}", status.signal());
    assert!(!se.contains("panicked") && status.code() != Some(101), "{what}: panicked\n{se}");
    (status.code().unwrap_or(-1), so, se)
}

/// The names of `domain`'s objects in `dir`, sorted.
pub fn objects(dir: &Path, domain: &str) -> Vec<String> {
    let prefix = format!("shmgadget.{domain}:");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    v.sort();
    v
}
