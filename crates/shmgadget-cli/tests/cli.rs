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
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "big");
    assert_eq!(list[0]["reserved"], 16u64 << 30);
    assert_eq!(list[0]["committed"], 1u64 << 20);
    assert!(list[0]["resident"].as_u64().unwrap() >= 1 << 20);

    let out = shmgadget(&[&d[..], &["info", "big"]].concat());
    assert!(stdout(&out).contains("persistent"), "{}", stdout(&out));

    let out = shmgadget(&["domains", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(all.as_array().unwrap().iter().any(|e| e["name"] == domain.as_str()));

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
    assert_eq!(v["check"], "ok");
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
