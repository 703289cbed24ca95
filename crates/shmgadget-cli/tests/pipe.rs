//! `shmgadget ... | head -1`: a reader that goes away never makes the tool panic.

use std::process::{Command, Stdio};

/// Runs `shmgadget args` with its stdout a pipe whose reader is closed before the command
/// writes anything; returns (exit code, stderr).
fn run_into_closed_pipe(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shmgadget"))
        .args(args)
        .env("SHMGADGET_SHM_DIR", dir)
        .env_remove("SHMGADGET_DOMAIN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_command_exits_quietly_when_its_reader_closes_the_pipe() {
    let dir = std::env::temp_dir().join(format!("shmgadget-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ok = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shmgadget")).args(args).env("SHMGADGET_SHM_DIR", &dir).output();
        assert!(out.unwrap().status.success(), "setup {args:?}");
    };
    ok(&["-d", "p", "create", "keep", "--size", "1M"]);
    ok(&["-d", "p", "create", "h", "--size", "1M", "--kind", "heap"]);
    ok(&["-d", "p", "create", "q", "--size", "64K", "--kind", "queue"]);
    let commands: &[&[&str]] = &[
        &["domains"],
        &["-d", "p", "ls"],
        &["-d", "p", "info", "q"],
        &["-d", "p", "heap", "h", "--blocks", "--check"],
        &["-d", "p", "create", "x", "--size", "1M"],
        &["-d", "p", "rm", "x"],
        &["-d", "p", "gc"],
        &["demo", "--nodes", "1000"],
        &["--help"],
        &["--version"],
    ];
    for json in [false, true] {
        for args in commands {
            let mut args = args.to_vec();
            if json {
                args.push("--json");
            }
            let (code, err) = run_into_closed_pipe(&dir, &args);
            assert!(!err.contains("panicked"), "{args:?} panicked on a closed pipe: {err}");
            assert!(matches!(code, Some(0) | Some(141)), "{args:?} exited {code:?} on a closed pipe: {err}");
        }
    }
    ok(&["-d", "p", "rm", "keep"]);
    ok(&["-d", "p", "rm", "h"]);
    ok(&["-d", "p", "rm", "q"]);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir(&dir).unwrap();
}
