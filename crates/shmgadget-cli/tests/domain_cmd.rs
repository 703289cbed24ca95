//! `domain create` / `domain rm`, domains shared across users, and root cleaning up another
//! user's domain. The cross-user tests need root (they act as uid 65534) and are skipped
//! otherwise, saying so.

mod common;

use common::shmgadget as cli;

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65534;

/// A private shm directory (sticky, world-writable like /dev/shm), removed on drop with
/// anything left in it, and children killed.
struct Dir(PathBuf, Vec<Child>);

impl Dir {
    fn new(tag: &str) -> Dir {
        let dir = PathBuf::from(format!("/dev/shm/sgtest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        Dir(dir, Vec::new())
    }
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(&self.0).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(dir: &Path, args: &[&str]) -> Output {
    cli(dir, args).output().unwrap()
}

fn as_nobody(dir: &Path, args: &[&str]) -> Output {
    cli(dir, args).uid(NOBODY).gid(NOBODY).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// Not a test of its own: a process that attaches a domain and stays until killed.
#[test]
fn attached_role() {
    let Ok(domain) = std::env::var("SHMG_DOMCMD_ATTACH") else { return };
    let d =
        shmgadget::Domain::attach_with(&domain, &shmgadget::DomainOptions { must_exist: true, ..Default::default() })
            .unwrap();
    println!("ATTACHED");
    std::thread::sleep(Duration::from_secs(60));
    drop(d);
}

/// Starts [`attached_role`] on `domain` and waits (at most 30 s) until it is attached.
fn attach_in_child(dir: &Dir, domain: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "attached_role", "--nocapture", "--test-threads=1"])
        .env("SHMG_DOMCMD_ATTACH", domain)
        .env("SHMGADGET_SHM_DIR", &dir.0)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains("ATTACHED") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("the child never attached");
    child
}

#[test]
fn a_created_domain_has_its_mode_and_limits_and_stays_empty_until_domain_rm() {
    let dir = Dir::new("domcreate");
    let d = &dir.0;
    let o = run(d, &["domain", "create", "keep", "--mode", "660", "--window-size", "64G", "--max-sections", "32"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dir.files(), ["shmgadget.keep:registry"]);
    let mode = std::fs::metadata(d.join("shmgadget.keep:registry")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "the registry object's mode follows --mode");
    // Empty and unattached, it survives gc and an attach/detach that creates nothing.
    let o = run(d, &["gc", "--all"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(d, &["-d", "keep", "rm", "-f", "nothing"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dir.files(), ["shmgadget.keep:registry"], "a created domain stays while empty");
    // Its limits and creator, `ipcs -l`-like.
    let o = run(d, &["-d", "keep", "info", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    assert_eq!(v["mode"], "0660");
    assert_eq!(v["window_size"], 64u64 << 30);
    assert_eq!(v["max_sections"], 32);
    assert_eq!(v["kept"], true);
    // Sections default to the domain's mode; an explicit --mode still wins.
    let o = run(d, &["-d", "keep", "create", "a", "--size", "4K"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(d, &["-d", "keep", "create", "h", "--size", "1M", "--kind", "heap"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(d, &["-d", "keep", "create", "b", "--size", "4K", "--mode", "600"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(d, &["-d", "keep", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mode_of = |n: &str| v["sections"].as_array().unwrap().iter().find(|s| s["name"] == n).unwrap()["mode"].clone();
    assert_eq!(mode_of("a"), "0660");
    assert_eq!(mode_of("h"), "0660", "heaps follow the domain's mode too");
    assert_eq!(mode_of("b"), "0600");
    // A second create of the same name is refused and changes nothing.
    let o = run(d, &["domain", "create", "keep", "--mode", "666"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists already"), "{}", text(&o));
    // domain rm takes everything.
    let o = run(d, &["domain", "rm", "keep", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["sections"].as_array().unwrap().len(), 3, "{v}");
    assert!(dir.files().is_empty(), "left behind: {:?}", dir.files());
    let o = run(d, &["domain", "rm", "keep"]);
    assert_eq!(o.status.code(), Some(1), "a missing domain is an error: {}", text(&o));
}

#[test]
fn domain_rm_is_refused_while_a_live_process_is_attached_unless_forced() {
    let mut dir = Dir::new("domrm");
    let d = dir.0.clone();
    let o = run(&d, &["-d", "busy", "create", "s", "--size", "1M"]);
    assert!(o.status.success(), "{}", text(&o));
    let child = attach_in_child(&dir, "busy");
    let pid = child.id();
    dir.1.push(child);
    // ps shows it: pid, command name, alive.
    let o = run(&d, &["-d", "busy", "ps", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    let p = &v["processes"][0];
    assert_eq!((p["pid"].as_u64(), p["alive"].as_bool()), (Some(pid as u64), Some(true)), "{v}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(p["command"], comm.trim_end(), "{v}");
    let o = run(&d, &["-d", "busy", "ps"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains(&pid.to_string()) && table.contains("alive"), "{table}");
    let o = run(&d, &["domain", "rm", "busy"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("pid {pid}")) && err.contains("--force"), "{}", text(&o));
    assert_eq!(dir.files().len(), 2, "nothing was removed: {:?}", dir.files());
    let o = run(&d, &["domain", "rm", "busy", "--force", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["attached"][0]["pid"], pid, "{v}");
    assert!(dir.files().is_empty(), "left behind: {:?}", dir.files());
    // The attached process dies later without finding its names: nothing comes back.
    for c in &mut dir.1 {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    dir.1.clear();
    assert!(dir.files().is_empty(), "left behind: {:?}", dir.files());
}

#[test]
fn ps_shows_a_process_killed_without_detaching_as_dead() {
    let mut dir = Dir::new("domps");
    let d = dir.0.clone();
    let o = run(&d, &["-d", "psd", "create", "s", "--size", "4K"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut child = attach_in_child(&dir, "psd");
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    let o = run(&d, &["-d", "psd", "ps", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    let p = &v["processes"][0];
    assert_eq!((p["pid"].as_u64(), p["alive"].as_bool()), (Some(pid as u64), Some(false)), "{v}");
    assert!(p["command"].is_null(), "a dead pid's name is not shown: {v}");
    let o = run(&d, &["domain", "rm", "psd"]);
    assert!(o.status.success(), "a dead process does not block domain rm: {}", text(&o));
    dir.1.clear();
    assert!(dir.files().is_empty(), "left behind: {:?}", dir.files());
}

#[test]
fn a_0666_domain_created_by_root_is_used_by_uid_65534() {
    if !is_root() {
        eprintln!("skipped: acting as uid 65534 needs root");
        return;
    }
    let dir = Dir::new("domshare");
    let d = &dir.0;
    let o = run(d, &["domain", "create", "shared", "--mode", "666"]);
    assert!(o.status.success(), "{}", text(&o));
    // Another user's registry is not trusted by default, and the advice names a real flag.
    let o = as_nobody(d, &["-d", "shared", "create", "s", "--size", "1M"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-foreign-owner"), "{}", text(&o));
    // With it, uid 65534 creates, lists and removes sections in root's domain.
    let o = as_nobody(d, &["-d", "shared", "--allow-foreign-owner", "create", "s", "--size", "1M"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_nobody(d, &["-d", "shared", "--allow-foreign-owner", "create", "h", "--size", "1M", "--kind", "heap"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_nobody(d, &["-d", "shared", "ls", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for s in v["sections"].as_array().unwrap() {
        assert_eq!(s["owner_uid"], NOBODY, "{s}");
        assert_eq!(s["mode"], "0666", "the section follows the domain's mode: {s}");
    }
    let o = as_nobody(d, &["-d", "shared", "--allow-foreign-owner", "heap", "h", "--check"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_nobody(d, &["-d", "shared", "--allow-foreign-owner", "rm", "s"]);
    assert!(o.status.success(), "{}", text(&o));
    // Root opens the stranger's heap in its own domain (told the flag's name without it),
    // then removes the whole domain.
    let o = run(d, &["-d", "shared", "heap", "h"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-foreign-owner"), "{}", text(&o));
    let o = run(d, &["-d", "shared", "--allow-foreign-owner", "heap", "h"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(d, &["domain", "rm", "shared"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.files().is_empty(), "left behind: {:?}", dir.files());
}

#[test]
fn root_removes_a_domain_owned_by_uid_65534_with_the_flag_its_messages_name() {
    if !is_root() {
        eprintln!("skipped: acting as uid 65534 needs root");
        return;
    }
    let dir = Dir::new("domforeign");
    let d = &dir.0;
    for n in ["a", "b"] {
        let o = as_nobody(d, &["-d", "theirs", "create", n, "--size", "1M"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = as_nobody(d, &["-d", "theirs", "create", "t", "--size", "1M", "--transient"]);
    assert!(o.status.success(), "{}", text(&o));
    // Without the flag: refused, and the message names the flag.
    let o = run(d, &["-d", "theirs", "rm", "a"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-foreign-owner"), "{}", text(&o));
    // gc -d of a domain it skips does not claim success.
    let o = run(d, &["-d", "theirs", "gc"]);
    assert_eq!(o.status.code(), Some(1), "gc -d X must not exit 0 while skipping X: {}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--allow-foreign-owner"), "{}", text(&o));
    // The flag the messages name is accepted by rm and gc and works.
    let o = run(d, &["-d", "theirs", "--allow-foreign-owner", "rm", "a"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(d, &["-d", "theirs", "gc", "--allow-foreign-owner"]);
    assert!(o.status.success(), "{}", text(&o));
    let files = dir.files();
    assert!(files.len() == 2 && files.iter().any(|f| f.ends_with(":b")), "only b and the registry are left: {files:?}");
    let o = run(d, &["domain", "rm", "theirs"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = run(d, &["domain", "rm", "theirs", "--allow-foreign-owner"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.files().is_empty(), "left behind: {:?}", dir.files());
}
