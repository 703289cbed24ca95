//! Names and domains as a user types them: a name that looks like an option is refused, a
//! mistyped `-d` is an error rather than a new domain, and `create` says when it made one.

use std::path::Path;
use std::process::{Command, Output};

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shmgadget"))
        .args(args)
        .env("SHMGADGET_SHM_DIR", dir)
        .env_remove("SHMGADGET_DOMAIN")
        .output()
        .unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    v.sort();
    v
}

fn private_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shmgadget-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn names_starting_with_a_dash_or_a_dot_are_refused_by_the_cli_and_the_library() {
    let dir = private_dir("names");
    for bad in ["-dash", ".hidden", "-"] {
        let out = run(&dir, &["-d", "n", "create", "--size", "1M", "--", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {err}");
        assert!(err.contains("invalid section name") && err.contains("starts with"), "{bad:?}: {err}");
        let out = run(&dir, &[&format!("--domain={bad}"), "create", "s", "--size", "1M"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("invalid domain name"), "{bad:?}: {err}");
    }
    // The library says the same (the C interface goes through it too).
    let e = shmgadget::inspect::inspect_domain("-x", Some(&dir)).unwrap_err();
    assert_eq!(e.kind(), shmgadget::ErrorKind::InvalidName, "{e}");
    assert!(files(&dir).is_empty(), "nothing made: {:?}", files(&dir));
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn read_only_commands_never_create_a_domain_and_create_announces_the_one_it_makes() {
    let dir = private_dir("ro");
    for args in [
        &["-d", "typo", "ls"][..],
        &["-d", "typo", "info", "s"],
        &["-d", "typo", "heap", "s"],
        &["-d", "typo", "rm", "s"],
        &["-d", "typo", "ls", "--json"],
    ] {
        let out = run(&dir, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("domain \"typo\" does not exist"), "{args:?}: {err}");
        assert!(files(&dir).is_empty(), "{args:?} left {:?}", files(&dir));
    }
    let out = run(&dir, &["domains"]);
    assert!(out.status.success() && files(&dir).is_empty());

    let out = run(&dir, &["-d", "fresh", "create", "s", "--size", "1M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("created domain \"fresh\""), "an implicit domain creation is announced: {err}");
    // An existing section that is missing in an existing domain leaves the registry as it was.
    let before = files(&dir);
    for args in [&["-d", "fresh", "info", "nope"][..], &["-d", "fresh", "heap", "nope"]] {
        assert_eq!(run(&dir, args).status.code(), Some(1), "{args:?}");
        assert_eq!(files(&dir), before, "{args:?}");
    }
    let out = run(&dir, &["-d", "fresh", "create", "t", "--size", "1M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("created domain"), "only a new domain is announced: {err}");

    // A transient section with nobody else attached: the command says it is gone again.
    let out = run(&dir, &["-d", "fresh", "create", "tr", "--size", "1M", "--transient"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("removed it again on exit"), "{text}");
    assert!(!files(&dir).iter().any(|f| f.ends_with(":tr")), "{:?}", files(&dir));

    assert!(run(&dir, &["-d", "fresh", "rm", "s"]).status.success());
    assert!(run(&dir, &["-d", "fresh", "rm", "t"]).status.success());
    assert!(files(&dir).is_empty(), "left {:?}", files(&dir));
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn domains_keeps_an_unreadable_registrys_explanation_out_of_the_table() {
    let dir = private_dir("unreadable");
    std::fs::write(dir.join("shmgadget.bad:registry"), vec![0x5a; 4096]).unwrap();
    let out = run(&dir, &["domains"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let (table, notes): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| !l.starts_with("domain "));
    assert!(table.iter().any(|l| l.contains("UNREADABLE")), "{text}");
    for l in &table {
        assert!(l.chars().count() < 120, "a table line {} characters wide: {l}", l.chars().count());
    }
    assert!(notes.iter().any(|l| l.starts_with("domain \"bad\" is unreadable: ")), "{text}");
    let out = run(&dir, &["domains", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["domains"][0]["status"], "unreadable", "{v}");
    assert!(v["domains"][0]["error"].is_string(), "{v}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rm_takes_several_names_removes_nothing_on_a_typo_and_f_skips_missing_ones() {
    let dir = private_dir("rm");
    for s in ["a", "b", "c"] {
        assert!(run(&dir, &["-d", "r", "create", s, "--size", "64K"]).status.success());
    }
    let before = files(&dir);
    let out = run(&dir, &["-d", "r", "rm", "a", "typo", "b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("\"typo\"") && err.contains("nothing was removed"), "{err}");
    assert_eq!(files(&dir), before, "a typo among several names removes nothing");
    let out = run(&dir, &["-d", "r", "rm", "a", "b"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let out = run(&dir, &["-d", "r", "rm", "-f", "a", "c", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["removed"], serde_json::json!([{"name": "c"}]), "{v}");
    assert!(files(&dir).is_empty(), "the last section took the domain with it: {:?}", files(&dir));
    let out = run(&dir, &["-d", "r", "rm", "-f", "a"]);
    assert!(out.status.success(), "rm -f of a missing domain: {}", String::from_utf8_lossy(&out.stderr));
    assert!(files(&dir).is_empty());
    std::fs::remove_dir(&dir).unwrap();
}
