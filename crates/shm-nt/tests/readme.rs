//! The README's C example, taken from README.md between its markers, compiled as C (`cc`)
//! and as C++ (`c++`) with warnings as errors, and run: the writer, then the reader in
//! another process, which must print what the writer published. So the README cannot drift.

use std::path::{Path, PathBuf};
use std::process::Command;

fn lib_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps, next to libshm_nt.so.
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

/// The body of the fenced block between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->`.
fn snippet(marker: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let begin = format!("<!-- {marker}:begin -->");
    let end = format!("<!-- {marker}:end -->");
    let start = readme.find(&begin).unwrap_or_else(|| panic!("README.md has no {begin}")) + begin.len();
    let stop = readme[start..].find(&end).unwrap_or_else(|| panic!("README.md has no {end}")) + start;
    let block = readme[start..stop].trim();
    let body = block.strip_prefix("```c").and_then(|b| b.strip_suffix("```"));
    body.unwrap_or_else(|| panic!("{marker}: not one ```c block: {block}")).to_owned()
}

fn build(compiler: &str, lang: &[&str], src: &Path, out: &Path) {
    let lib = lib_dir();
    assert!(lib.join("libshm_nt.so").exists(), "libshm_nt.so not built in {}", lib.display());
    let o = Command::new(compiler)
        .args(lang)
        .args(["-Wall", "-Wextra", "-Werror"])
        .arg(concat!("-I", env!("CARGO_MANIFEST_DIR"), "/include"))
        .arg(src)
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lshm_nt")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{compiler} {lang:?} {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_readme_c_example_compiles_as_c_and_as_cpp_and_the_reader_sees_the_writers_pointer() {
    let tmp = std::env::temp_dir().join(format!("shm-nt-readme-{}", std::process::id()));
    let shm = tmp.join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    for (compiler, lang) in [("cc", &["-x", "c", "-std=c11"][..]), ("c++", &["-x", "c++", "-std=c++17"])] {
        let mut exes = Vec::new();
        for part in ["writer", "reader"] {
            let src = tmp.join(format!("{part}.src"));
            std::fs::write(&src, snippet(&format!("readme-c-{part}"))).unwrap();
            let exe = tmp.join(format!("{part}-{compiler}"));
            build(compiler, lang, &src, &exe);
            exes.push(exe);
        }
        let domain = format!("readme-{}", compiler.replace('+', "p"));
        for (exe, want) in [(&exes[0], "pool"), (&exes[1], "hello from pid 42")] {
            let o = Command::new(exe)
                .env("LD_LIBRARY_PATH", lib_dir())
                .env("SHMGADGET_DOMAIN", &domain)
                .env("SHMGADGET_SHM_DIR", &shm)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{compiler} {}: {}\n{text}{}",
                exe.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(text.contains(want), "{compiler} {}: {text}", exe.display());
        }
        // The README's clean-up, done through the library.
        let opts = shmgadget::DomainOptions { must_exist: true, shm_dir: Some(shm.clone()), ..Default::default() };
        let d = shmgadget::Domain::attach_with(&domain, &opts).unwrap();
        d.delete_section("root").unwrap();
        d.delete_section("pool").unwrap();
        d.detach().unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(&shm).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
