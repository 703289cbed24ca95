//! The committed `include/shm_nt.h` is what cbindgen makes of `src/lib.rs` now.
//! Regenerate it with `SHM_NT_REGENERATE=1 cargo test -p shm-nt --test header`.

#[test]
fn the_committed_header_is_up_to_date() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads src/lib.rs")
        .write(&mut generated);
    // Negative codes in parentheses, as the classic header has them: `#define SHM_ERR_OS (-8)`.
    let generated: Vec<u8> = String::from_utf8(generated)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("#define ").and_then(|r| r.split_once(" -")) {
            Some((name, n)) => format!("#define {name} (-{n})\n"),
            None => format!("{l}\n"),
        })
        .collect::<String>()
        .into_bytes();
    let path = format!("{dir}/include/shm_nt.h");
    if std::env::var_os("SHM_NT_REGENERATE").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/shm_nt.h is out of date; regenerate it with `SHM_NT_REGENERATE=1 cargo test -p shm-nt --test header`"
    );
}
