//! A full backing store is an error, everywhere: with the tmpfs full, every command (create,
//! open, list, gc, domain creation) fails or succeeds cleanly in its own process, and none
//! dies of SIGBUS. Needs root to mount a small tmpfs; skipped otherwise.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn cli(dir: &Path, domain: &str, args: &[&str]) -> (Option<i32>, Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shmgadget"))
        .args(["--domain", domain])
        .args(args)
        .env("SHMGADGET_SHM_DIR", dir)
        .env_remove("SHMGADGET_DOMAIN")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), out.status.signal(), text)
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn with_the_store_full_every_command_fails_or_succeeds_cleanly_and_none_gets_sigbus() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let mnt = std::env::temp_dir().join(format!("shmg-cli-full-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "shmg-test"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = std::fs::remove_dir(&mnt);
        eprintln!("skipped: could not mount a tmpfs (no CAP_SYS_ADMIN in this container?)");
        return;
    }
    let mnt = Mount(mnt);
    let dir = mnt.0.as_path();
    // A domain in use before the store fills: a raw section with data, a heap.
    for args in
        [&["create", "keep", "--size", "1M", "--commit", "64K"][..], &["create", "h", "--size", "2M", "--kind", "heap"]]
    {
        let (code, sig, text) = cli(dir, "full", args);
        assert_eq!((code, sig), (Some(0), None), "{args:?}: {text}");
    }
    // Fill the store.
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0x55u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    drop(f);
    let mut sigbus = Vec::new();
    let mut results = Vec::new();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("full", vec!["create", "x", "--size", "1M"]),
        ("full", vec!["create", "y", "--size", "1M", "--commit", "1M"]),
        ("full", vec!["create", "hq", "--size", "1M", "--kind", "heap"]),
        ("full", vec!["create", "q", "--size", "1M", "--kind", "queue"]),
        ("full", vec!["heap", "h", "--check"]),
        ("full", vec!["heap", "h", "--blocks"]),
        ("full", vec!["info", "keep"]),
        ("full", vec!["ls"]),
        ("full", vec!["domains"]),
        ("full", vec!["gc"]),
        ("newdomain", vec!["create", "z", "--size", "1M"]),
        ("newdomain", vec!["ls"]),
        ("full", vec!["rm", "x"]),
        ("full", vec!["gc", "--all"]),
    ];
    for round in 0..3 {
        for (domain, args) in &cases {
            let (code, sig, text) = cli(dir, domain, args);
            if sig.is_some() {
                sigbus.push(format!("round {round} {domain} {args:?}: signal {sig:?}: {text}"));
            }
            assert_ne!(code, Some(101), "{args:?} panicked: {text}");
            results.push(format!("{domain} {args:?} -> {code:?}"));
        }
    }
    assert!(sigbus.is_empty(), "processes killed by a signal with the store full:\n{}", sigbus.join("\n"));
    // The failures are errors that say so, and the domain still works once there is room.
    let (code, _, text) = cli(dir, "newdomain", &["create", "z", "--size", "1M"]);
    assert_ne!(code, Some(0), "a new domain's registry cannot be committed on a full store: {text}");
    assert!(text.contains("full") || text.contains("space"), "{text}");
    std::fs::remove_file(dir.join("filler")).unwrap();
    let (code, _, text) = cli(dir, "full", &["heap", "h", "--check"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, _, text) = cli(dir, "newdomain", &["create", "z", "--size", "1M"]);
    assert_eq!(code, Some(0), "{text}");
    eprintln!("{}", results.join("\n"));
}

/// `geteuid(2)` without a libc dependency in this crate's tests.
unsafe fn libc_geteuid() -> u32 {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() }
}
