//! C and C++ programs against `shm_nt.h` and `libshm_nt`, compiled with the system compilers
//! (`cc -std=c11 -Wall -Wextra -Werror`, `c++`) and run as separate processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lib_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps, next to libshm_nt.so.
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

fn compile(compiler: &str, std: &str, src: &str, out: &Path) {
    let dir = env!("CARGO_MANIFEST_DIR");
    let lib = lib_dir();
    assert!(lib.join("libshm_nt.so").exists(), "libshm_nt.so not built in {}", lib.display());
    let o = Command::new(compiler)
        .args([std, "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(format!("-I{dir}/include"))
        .arg(format!("{dir}/tests/c/{src}"))
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lshm_nt")
        .output()
        .unwrap();
    assert!(o.status.success(), "{compiler} {src} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn run(exe: &Path, domain: &str, args: &[&str]) -> Output {
    let o = Command::new(exe).args(args).env("SHMGADGET_DOMAIN", domain).output().unwrap();
    eprintln!(
        "--- {} {args:?}: {}\n{}{}",
        exe.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deletes what a test left in its domain and checks /dev/shm is clean.
fn clean(domain: &str) {
    let opts = shmgadget::DomainOptions { must_exist: true, ..Default::default() };
    if let Ok(d) = shmgadget::Domain::attach_with(domain, &opts) {
        for s in d.sections() {
            d.delete_section(&s.name).unwrap();
        }
        d.detach().unwrap();
    }
    let prefix = format!("shmgadget.{domain}:");
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn program(tag: &str) -> PathBuf {
    let exe = std::env::temp_dir().join(format!("shm_nt_{tag}_{}", std::process::id()));
    compile("cc", "-std=c11", "shm_test.c", &exe);
    exe
}

#[test]
fn a_list_built_by_one_c_process_is_walked_and_freed_by_another() {
    let exe = program("list");
    let domain = format!("cnt-list-{}", std::process::id());
    let b = run(&exe, &domain, &["build"]);
    assert!(b.status.success() && text(&b).contains("built 100000 nodes"));
    let w = run(&exe, &domain, &["walk"]);
    assert!(w.status.success() && text(&w).contains("walked 100000 nodes, sum ok, heap consistent"), "{}", text(&w));
    clean(&domain);
    let _ = std::fs::remove_file(exe);
}

#[test]
fn two_c_processes_pass_messages_through_a_queue_with_a_semaphore() {
    let exe = program("queue");
    let domain = format!("cnt-q-{}", std::process::id());
    let reader = Command::new(&exe).arg("reader").env("SHMGADGET_DOMAIN", &domain).spawn().unwrap();
    let w = run(&exe, &domain, &["writer"]);
    assert!(w.status.success(), "writer failed");
    let r = reader.wait_with_output().unwrap();
    assert!(r.status.success(), "reader failed");
    clean(&domain);
    let _ = std::fs::remove_file(exe);
}

#[test]
fn every_error_code_reaches_c_callers() {
    let exe = program("errors");
    let domain = format!("cnt-err-{}", std::process::id());
    let e = run(&exe, &domain, &["errors"]);
    let out = text(&e);
    assert!(e.status.success() && out.contains("errors done"), "{out}");
    assert!(out.contains("corrupt: ") && out.contains("tag"), "{out}");
    let small = out.lines().find_map(|l| l.strip_prefix("small at ")).unwrap().trim().to_owned();
    let o = run(&exe, &domain, &["os_error", &small]);
    assert!(o.status.success(), "{}", text(&o));
    clean(&domain);
    let _ = std::fs::remove_file(exe);
}

#[test]
fn the_header_compiles_as_cpp_and_works() {
    let exe = std::env::temp_dir().join(format!("shm_nt_cpp_{}", std::process::id()));
    compile("c++", "-std=c++17", "cpp_test.cpp", &exe);
    let domain = format!("cnt-cpp-{}", std::process::id());
    let o = run(&exe, &domain, &[]);
    assert!(o.status.success() && text(&o).contains("c++ ok"));
    clean(&domain);
    let _ = std::fs::remove_file(exe);
}
