//! The `shmgadget` binary, run as a user runs it.

use std::process::{Command, Output};

fn shmgadget(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shmgadget")).args(args).env_remove("SHMGADGET_DOMAIN").output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn leftovers(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn demo_walks_the_builders_pointers_in_a_second_process_and_cleans_up() {
    let out = shmgadget(&["demo", "--nodes", "100000"]);
    let text = stdout(&out);
    assert!(out.status.success(), "demo failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let addrs: Vec<&str> =
        text.lines().filter_map(|l| l.split(" mapped at ").nth(1)?.split([' ', ';']).next()).collect();
    assert_eq!(addrs.len(), 2, "{text}");
    assert_eq!(addrs[0], addrs[1], "both processes map the section at the same address");
    assert!(text.contains("followed 100000 pointers") && text.contains("OK (matches"), "{text}");
    assert!(text.contains("mapped on first touch, no explicit open"), "the walker never opens the section: {text}");
    assert!(text.contains("found 60000 of 60000 keys"), "several processes filled one shared map: {text}");
    assert!(text.contains("2000000 messages in order") && text.contains("M messages/s"), "queue phase: {text}");
    let demo_domain = text.split("domain \"").nth(1).unwrap().split('"').next().unwrap();
    assert!(leftovers(&format!("shmgadget.{demo_domain}:")).is_empty());
}

#[test]
fn create_list_inspect_and_remove_a_section() {
    let domain = format!("cli-{}", std::process::id());
    let d = ["--domain", domain.as_str()];
    let out = shmgadget(&[&d[..], &["create", "big", "--size", "16G", "--commit", "1M"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("16.0 GiB reserved"));

    let out = shmgadget(&[&d[..], &["ls", "--json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = &v["sections"];
    assert_eq!(list[0]["name"], "big");
    assert_eq!(list[0]["reserved"], 16u64 << 30);
    assert_eq!(list[0]["committed"], 1u64 << 20);
    assert!(list[0]["resident"].as_u64().unwrap() >= 1 << 20);

    let out = shmgadget(&[&d[..], &["info", "big"]].concat());
    assert!(stdout(&out).contains("persistent"), "{}", stdout(&out));

    let out = shmgadget(&["domains", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(all["domains"].as_array().unwrap().iter().any(|e| e["name"] == domain.as_str()));

    let out = shmgadget(&[&d[..], &["create", "big", "--size", "1M"]].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let out = shmgadget(&[&d[..], &["rm", "big"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        leftovers(&format!("shmgadget.{domain}:")).is_empty(),
        "the last section's removal also removed the registry"
    );
}

#[test]
fn user_errors_exit_non_zero_with_advice() {
    let out = shmgadget(&["--domain", "no-such-domain-xyz", "ls"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shmgadget domains"));
    let out = shmgadget(&["--domain", "bad/name", "ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not allowed"));
    let out = shmgadget(&["create", "x", "--size", "12Q"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
}

#[test]
fn gc_reports_what_it_removed() {
    let domain = format!("cli-gc-{}", std::process::id());
    // A persistent section keeps the domain; gc leaves it (no dead process, nothing transient).
    assert!(shmgadget(&["--domain", &domain, "create", "keep", "--size", "4K"]).status.success());
    let out = shmgadget(&["--domain", &domain, "gc"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("nothing to clean up"), "{}", stdout(&out));
    // An orphaned object of this domain (as a crash could leave) is removed.
    std::fs::write(format!("/dev/shm/shmgadget.{domain}:999:ghost"), b"").unwrap();
    let out = shmgadget(&["--domain", &domain, "gc"]);
    assert!(stdout(&out).contains("ghost"), "{}", stdout(&out));
    assert!(shmgadget(&["--domain", &domain, "rm", "keep"]).status.success());
    assert!(leftovers(&format!("shmgadget.{domain}:")).is_empty());
}

#[test]
fn heap_check_passes_on_a_sound_heap_and_fails_with_status_1_on_a_damaged_one() {
    let domain = format!("cli-heap-{}", std::process::id());
    let d = ["--domain", domain.as_str()];
    let out = shmgadget(&[&d[..], &["create", "h", "--size", "8M", "--kind", "heap"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = shmgadget(&[&d[..], &["heap", "h", "--check", "--json"]].concat());
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["check"]["ok"], true);
    assert_eq!(v["stats"]["used_blocks"], 0);
    // Damage the first block's header (16 KiB into the section: the block area) on disk.
    let object = leftovers(&format!("shmgadget.{domain}:")).into_iter().find(|n| n.ends_with(":h")).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(format!("/dev/shm/{object}")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xAA; 8], (16 << 10) + 8).unwrap();
    let out = shmgadget(&[&d[..], &["heap", "h", "--check"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("check FAILED") && stdout(&out).contains("tag"), "{}", stdout(&out));
    assert!(shmgadget(&[&d[..], &["rm", "h"]].concat()).status.success());
    assert!(leftovers(&format!("shmgadget.{domain}:")).is_empty());
}

#[test]
fn heap_lists_named_sync_objects_with_their_state_and_a_dead_mutex_owner() {
    use shmgadget::heap::Heap;
    use shmgadget::sync::{Mutex, Semaphore};
    const TEST: &str = "heap_lists_named_sync_objects_with_their_state_and_a_dead_mutex_owner";
    if std::env::var("SHMG_CLI_ROLE").as_deref() == Ok("holder") {
        // A process that takes the mutex and is then killed while holding it.
        let d = shmgadget::Domain::attach(&std::env::var("SHMG_CLI_DOMAIN").unwrap()).unwrap();
        let heap = Heap::open(&d, "objs").unwrap();
        let m = heap.find::<Mutex<u64>>("guard").unwrap();
        let g = m.lock().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(60));
        drop(g);
        return;
    }
    let domain = format!("cli-objs-{}", std::process::id());
    let d = shmgadget::Domain::attach(&domain).unwrap();
    let heap = Heap::create(&d, "objs", 4 << 20).unwrap();
    let (sem, _) = heap.find_or_zeroed::<Semaphore>("tokens").unwrap();
    sem.init(3).unwrap();
    let (m, _) = heap.find_or_init_mutex("guard", || 0u64).unwrap();
    heap.find_or_init::<u64>("plain", || 5).unwrap();
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture"])
        .env("SHMG_CLI_ROLE", "holder")
        .env("SHMG_CLI_DOMAIN", &domain)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while m.raw().owner_pid() == 0 {
        assert!(std::time::Instant::now() < deadline, "the holder never took the mutex");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    holder.kill().unwrap();
    holder.wait().unwrap();

    let args = ["--domain", domain.as_str(), "heap", "objs"];
    let out = shmgadget(&[&args[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let objs = v["named_objects"].as_array().unwrap();
    let by_name = |n: &str| objs.iter().find(|o| o["name"] == n).unwrap_or_else(|| panic!("{n} missing: {v}"));
    assert_eq!(by_name("tokens")["kind"], "semaphore");
    assert_eq!(by_name("tokens")["state"]["count"], 3);
    assert_eq!(by_name("tokens")["state"]["waiters"], 0);
    assert_eq!(by_name("guard")["kind"], "mutex");
    assert_eq!(by_name("guard")["state"]["owner"], holder.id());
    assert_eq!(by_name("guard")["state"]["owner_alive"], false);
    assert_eq!(by_name("plain")["kind"], "data");
    assert!(by_name("plain")["state"].is_null());
    let text = stdout(&shmgadget(&args));
    assert!(text.contains("count 3, 0 waiting"), "{text}");
    assert!(text.contains(&format!("held by pid {} (dead", holder.id())), "{text}");

    // The next locker is told the owner died, and the CLI then shows the mutex free.
    assert!(matches!(m.lock(), Err(shmgadget::sync::LockError::OwnerDied(_))));
    let out = shmgadget(&[&args[..], &["--json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let guard = v["named_objects"].as_array().unwrap().iter().find(|o| o["name"] == "guard").unwrap().clone();
    assert!(guard["state"]["owner"].is_null(), "{guard}");
    assert_eq!(guard["state"]["inconsistent"], true, "not repaired (no make_consistent): {guard}");
    drop(heap);
    d.delete_section("objs").unwrap();
    d.detach().unwrap();
    assert!(leftovers(&format!("shmgadget.{domain}:")).is_empty());
}

#[test]
fn a_queue_is_created_listed_and_inspected() {
    let domain = format!("cli-q-{}", std::process::id());
    let d = ["--domain", domain.as_str()];
    let out = shmgadget(&[&d[..], &["create", "q", "--kind", "queue", "--size", "64K"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = shmgadget(&[&d[..], &["info", "q", "--json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "queue");
    assert_eq!(v["queue"]["capacity"], 65536);
    assert_eq!(v["queue"]["fill"], 0);
    let text = stdout(&shmgadget(&[&d[..], &["ls"]].concat()));
    assert!(text.contains("queue q: bytes queue, 0 of 65536 bytes waiting"), "{text}");
    assert!(shmgadget(&[&d[..], &["rm", "q"]].concat()).status.success());
    assert!(leftovers(&format!("shmgadget.{domain}:")).is_empty());
}

#[test]
fn gc_removes_and_reports_a_section_whose_creator_died_while_creating_it() {
    const TEST: &str = "gc_removes_and_reports_a_section_whose_creator_died_while_creating_it";
    if let Ok(domain) = std::env::var("SHMG_CLI_UNFINISHED") {
        // The creator: makes a heap section that never becomes ready, then waits to be killed.
        let d = shmgadget::Domain::attach(&domain).unwrap();
        let _s = shmgadget::__testing::create_unfinished(&d, "half", shmgadget::SectionKind::Heap, 1 << 20).unwrap();
        println!("UNFINISHED");
        std::thread::sleep(std::time::Duration::from_secs(60));
        return;
    }
    let domain = format!("cli-gcu-{}", std::process::id());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "-q"])
        .env("SHMG_CLI_UNFINISHED", &domain)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.trim() == "UNFINISHED")), "the creator never got there");
    let pid = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = shmgadget(&["--domain", &domain, "gc"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains(&format!("removed unfinished section \"half\" of domain \"{domain}\" (its creator, pid {pid}")),
        "{text}"
    );
    assert!(text.contains(&format!("removed domain \"{domain}\"")), "{text}");
    assert!(leftovers(&format!("shmgadget.{domain}:")).is_empty());
}
