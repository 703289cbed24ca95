//! Shell completions, the man page, and table style by output: box drawing only on a UTF-8
//! terminal, plain ASCII in a pipe or under a non-UTF-8 locale.

use std::process::{Command, Output};

fn shmgadget(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shmgadget")).args(args).env_remove("SHMGADGET_DOMAIN").output().unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Every visible subcommand, from `--help`.
fn subcommands() -> Vec<String> {
    let help = String::from_utf8(shmgadget(&["--help"]).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn completion_scripts_name_every_subcommand_and_parse_in_their_shell() {
    let subs = subcommands();
    assert!(subs.iter().any(|s| s == "domain") && subs.iter().any(|s| s == "ps"), "{subs:?}");
    for shell in ["bash", "zsh", "fish"] {
        let out = shmgadget(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).unwrap();
        for s in &subs {
            assert!(script.contains(s.as_str()), "{shell} completions lack {s:?}");
        }
        assert!(script.contains("allow-foreign-owner"), "{shell}: global flags completed too");
        if have(shell) {
            let path = std::env::temp_dir().join(format!("shmgadget-completion-{}.{shell}", std::process::id()));
            std::fs::write(&path, &script).unwrap();
            let check = Command::new(shell).arg("-n").arg(&path).output().unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(check.status.success(), "{shell} -n: {}", String::from_utf8_lossy(&check.stderr));
        } else {
            eprintln!("{shell} is not installed: its script was checked for the subcommands only");
        }
    }
    assert_eq!(shmgadget(&["completions", "tcsh"]).status.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn the_man_page_has_a_section_for_every_subcommand_and_renders() {
    let out = shmgadget(&["man"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with(".ie") && page.contains(".TH shmgadget 1"), "{}", &page[..200.min(page.len())]);
    for s in subcommands() {
        assert!(page.contains(&format!(".SH \"SHMGADGET {}\"", s.to_uppercase())), "no section for {s}");
    }
    assert!(page.contains(".SH \"SHMGADGET DOMAIN CREATE\""), "nested subcommands too");
    if have("man") {
        let path = std::env::temp_dir().join(format!("shmgadget-{}.1", std::process::id()));
        std::fs::write(&path, &page).unwrap();
        let r = Command::new("man").args(["-l", "--warnings"]).arg(&path).env("MANPAGER", "cat").output().unwrap();
        let _ = std::fs::remove_file(&path);
        let text = String::from_utf8_lossy(&r.stdout);
        assert!(r.status.success() && text.contains("SHMGADGET GC"), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(!String::from_utf8_lossy(&r.stderr).contains("warning"), "{}", String::from_utf8_lossy(&r.stderr));
    } else {
        eprintln!("man is not installed: the page was not rendered");
    }
}

/// Runs `ls` of a fresh domain with one section, its stdout a pipe or (`script`) a terminal.
fn ls_output(domain: &str, tty: bool, lang: &str) -> String {
    let exe = env!("CARGO_BIN_EXE_shmgadget");
    let out = if tty {
        // script(1) gives the command a pseudo-terminal and copies what it printed.
        Command::new("script")
            .args(["-qec", &format!("{exe} --domain {domain} ls"), "/dev/null"])
            .env("LANG", lang)
            .env_remove("LC_ALL")
            .env_remove("LC_CTYPE")
            .output()
            .unwrap()
    } else {
        Command::new(exe).args(["--domain", domain, "ls"]).env("LANG", lang).output().unwrap()
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn tables_use_box_drawing_only_on_a_utf8_terminal() {
    let domain = format!("tables-{}", std::process::id());
    assert!(shmgadget(&["--domain", &domain, "create", "s", "--size", "4K"]).status.success());
    let piped = ls_output(&domain, false, "C.UTF-8");
    assert!(piped.is_ascii() && piped.contains("| s "), "a pipe gets ASCII: {piped}");
    if have("script") {
        let utf8 = ls_output(&domain, true, "C.UTF-8");
        assert!(utf8.contains('│') && utf8.contains('┆'), "a UTF-8 terminal gets box drawing: {utf8}");
        let c = ls_output(&domain, true, "C");
        assert!(c.is_ascii() && c.contains("| s "), "a C-locale terminal gets ASCII: {c}");
    } else {
        eprintln!("script(1) is not installed: terminal output not checked");
    }
    assert!(shmgadget(&["--domain", &domain, "rm", "s"]).status.success());
}

#[test]
fn committing_a_gigabyte_on_a_terminal_shows_a_progress_bar_and_a_pipe_does_not() {
    if !have("script") {
        eprintln!("script(1) is not installed: the progress bar is not checked");
        return;
    }
    let domain = format!("bar-{}", std::process::id());
    let exe = env!("CARGO_BIN_EXE_shmgadget");
    let create = format!("{exe} --domain {domain} create big --size 1G --commit 1G");
    // script(1) gives the command a terminal for stderr too, and copies what it wrote.
    let tty = Command::new("script").args(["-qec", &create, "/dev/null"]).output().unwrap();
    let text = String::from_utf8_lossy(&tty.stdout).into_owned();
    assert!(tty.status.success(), "{text}");
    assert!(text.contains("committing"), "a terminal gets a progress bar: {text}");
    let info = shmgadget(&["--domain", &domain, "--json", "info", "big"]);
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(info.contains("\"committed\": 1073741824"), "everything committed: {info}");
    assert!(shmgadget(&["--domain", &domain, "rm", "big"]).status.success());
    let piped = shmgadget(&["--domain", &domain, "create", "big", "--size", "1G", "--commit", "1G"]);
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("committing"), "no bar into a pipe");
    assert!(shmgadget(&["--domain", &domain, "rm", "big"]).status.success());
}
