//! Helpers shared by the tests that compile C and C++ programs against `shm_nt.h` and run them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Where the freshly built `libshm_nt.so` is: the test binary lives in `target/<profile>/deps`,
/// next to it.
pub fn lib_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

/// Compiles `tests/c/<src>` with `compiler` and language standard `std` (warnings are errors)
/// into `out`, linked against the freshly built `libshm_nt`.
pub fn compile(compiler: &str, std: &str, src: &str, out: &Path) {
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

/// [`compile`] as C11 with `cc`.
pub fn compile_c(src: &str, out: &Path) {
    compile("cc", "-std=c11", src, out);
}

/// A command running a compiled program against the `libshm_nt.so` built next to this test.
/// The rpath alone is not enough: cargo puts `target/<profile>` first on `LD_LIBRARY_PATH`,
/// and a `libshm_nt.so` left there by an earlier `cargo build` would win over it.
pub fn launch(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c.env("LD_LIBRARY_PATH", lib_dir());
    c
}

/// Waits for `child`, at most `limit`: past it, kills it and fails the test naming `what`.
pub fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The objects of `domain` still in `/dev/shm`.
pub fn leftovers(domain: &str) -> Vec<String> {
    let prefix = format!("shmgadget.{domain}:");
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Checks `/dev/shm` holds nothing of `domain`.
pub fn assert_no_leftovers(domain: &str) {
    let left = leftovers(domain);
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

/// Deletes every section a test left in `domain` (if it still exists), detaches, and checks
/// `/dev/shm` holds nothing of it.
pub fn clean(domain: &str) {
    let opts = shmgadget::DomainOptions { must_exist: true, ..Default::default() };
    match shmgadget::Domain::attach_with(domain, &opts) {
        Ok(d) => {
            for s in d.sections() {
                d.delete_section(&s.name).unwrap();
            }
            d.detach().unwrap();
        }
        Err(e) => eprintln!("clean: {e}"),
    }
    assert_no_leftovers(domain);
}
