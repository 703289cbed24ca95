//! `shmgadget where ADDR` and `shmgadget map`: what they say, in text and in the JSON of
//! docs/cli-json.md (keys, their order, types).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn run(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shmgadget"))
        .args(args)
        .env("SHMGADGET_SHM_DIR", dir)
        .env_remove("SHMGADGET_DOMAIN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(dir: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, so, se) = run(dir, &a);
    assert_eq!(code, 0, "{args:?}\n{so}\n{se}");
    serde_json::from_str(&so).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {so}"))
}

/// The keys of a JSON object (as a set: that every documented key is there and nothing
/// else).
fn object_keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

const WHERE_KEYS: [&str; 15] = [
    "address",
    "place",
    "domain",
    "section",
    "section_kind",
    "section_address",
    "offset",
    "reserved",
    "committed",
    "resident",
    "mapped",
    "protection",
    "page_size",
    "free_start",
    "free_end",
];

fn is_addr(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.strip_prefix("0x").is_some_and(|h| u64::from_str_radix(h, 16).is_ok()))
}

#[test]
fn where_names_the_section_and_offset_or_the_hole_and_map_draws_sections_and_holes() {
    let dir = std::env::temp_dir().join(format!("shmgadget-memcmd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = &dir;
    let c = json(d, &["-d", "w", "create", "a", "--size", "1M", "--commit", "64K"]);
    let base = u64::from_str_radix(c["section"]["address"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    json(d, &["-d", "w", "create", "b", "--size", "4M"]);

    let at = format!("{:#x}", base + 0x1010);
    let v = json(d, &["where", &at]);
    let mut keys = object_keys(&v);
    keys.sort();
    let mut want: Vec<String> = WHERE_KEYS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(keys, want, "every documented key, nothing else");
    assert_eq!(v["place"], "section");
    assert_eq!((v["domain"].as_str(), v["section"].as_str()), (Some("w"), Some("a")));
    assert_eq!(v["offset"], 0x1010);
    assert_eq!((v["reserved"].as_bool(), v["committed"].as_bool()), (Some(true), Some(true)));
    assert!(is_addr(&v["address"]) && is_addr(&v["section_address"]));
    assert!(v["mapped"].is_null() && v["protection"].is_null(), "per-process facts are unknown from outside");
    assert_eq!(v["page_size"], 4096);
    let (code, text, _) = run(d, &["-d", "w", "where", &at]);
    assert_eq!(code, 0);
    assert!(text.contains("is offset 4112 (0x1010) of section \"a\" (raw) of domain \"w\""), "{text}");

    let hole = format!("{:#x}", base + (1 << 20) + 5);
    let v = json(d, &["where", &hole]);
    assert_eq!(v["place"], "free");
    assert_eq!(v["free_start"], format!("{:#x}", base + (1 << 20)));
    assert_eq!(v["free_end"], format!("{:#x}", base + (2 << 20)));
    let v = json(d, &["where", "0x1000"]);
    assert_eq!(v["place"], "not_ours");
    let (code, _, err) = run(d, &["where", "nonsense"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not an address"), "{err}");

    let m = json(d, &["-d", "w", "map"]);
    let regions = m["regions"].as_array().unwrap();
    let kinds: Vec<&str> = regions.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["section", "hole", "section", "hole"]);
    assert_eq!(regions[0]["name"], "a");
    assert_eq!(regions[0]["committed"], 65536);
    assert_eq!(regions[1]["size"], 1 << 20);
    let total: u64 = regions.iter().map(|r| r["size"].as_u64().unwrap()).sum();
    assert_eq!(total, m["window_size"].as_u64().unwrap(), "the regions cover the window exactly");
    for r in regions {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = ["kind", "address", "end", "size", "name", "section_kind", "committed", "resident", "page_size"];
        want.sort();
        let mut keys = keys.clone();
        keys.sort();
        assert_eq!(keys, want);
        assert!(is_addr(&r["address"]) && is_addr(&r["end"]));
    }
    let (_, text, _) = run(d, &["-d", "w", "map"]);
    assert!(text.contains("a (raw)") && text.contains("(hole)") && text.contains("b (raw)"), "{text}");

    run(d, &["-d", "w", "rm", "a", "b"]);
    let left: Vec<_> = std::fs::read_dir(d).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir(d).unwrap();
}

#[test]
fn where_and_map_report_a_file_sections_residency_from_its_file_not_from_its_link() {
    let dir = std::env::temp_dir().join(format!("shmgadget-fileres-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("res.shmg");
    let f = file.to_str().unwrap();
    let made = json(&dir, &["-d", "fres", "create", "fs", "--size", "8M", "--file", f]);
    let base = u64::from_str_radix(made["section"]["address"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    let at = |off: u64| format!("{:#x}", base + off);
    // Nothing of the data was touched: the link object's page is resident, the data is not.
    assert_eq!(json(&dir, &["where", &at(0)])["resident"], false);
    let m = json(&dir, &["-d", "fres", "map"]);
    assert_eq!(m["regions"][0]["resident"], 0, "{m}");
    // Three pages of data written through the file (after its header page).
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut fh = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        fh.seek(SeekFrom::Start(4096)).unwrap();
        fh.write_all(&[7u8; 3 * 4096]).unwrap();
    }
    assert_eq!(json(&dir, &["where", &at(0)])["resident"], true);
    assert_eq!(json(&dir, &["where", &at(2 * 4096 + 100)])["resident"], true);
    assert_eq!(json(&dir, &["where", &at(5 * 4096)])["resident"], false);
    let m = json(&dir, &["-d", "fres", "map"]);
    assert_eq!(m["regions"][0]["resident"], 3 * 4096, "the file's pages in the page cache: {m}");
    assert_eq!(m["regions"][0]["page_size"], 4096);
    let (code, _, err) = run(&dir, &["domain", "rm", "fres"]);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_file(&file);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn create_file_puts_a_section_in_a_file_that_ls_and_info_name_and_a_new_domain_places_it_again() {
    let dir = std::env::temp_dir().join(format!("shmgadget-filesec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("data.shmg");
    let f = file.to_str().unwrap();
    let d = dir.to_str().unwrap();
    let made = json(&dir, &["-d", "fsa", "create", "keep", "--size", "1M", "--file", f]);
    assert_eq!(made["section"]["file"], f, "{made}");
    let ls = json(&dir, &["-d", "fsa", "ls"]);
    assert_eq!(ls["sections"][0]["file"], f, "{ls}");
    let (code, out, err) = run(&dir, &["-d", "fsa", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("raw in {f}")), "{out}");
    let (code, out, err) = run(&dir, &["-d", "fsa", "info", "keep"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("file") && l.contains(f)), "{out}");
    let address = ls["sections"][0]["address"].clone();
    // The domain goes, the file stays; a new domain places it at the same address.
    let (code, _, err) = run(&dir, &["domain", "rm", "fsa"]);
    assert_eq!(code, 0, "{err}");
    assert!(file.exists());
    let again = json(&dir, &["-d", "fsb", "create", "back", "--size", "4K", "--file", f]);
    assert_eq!(again["section"]["address"], address, "{again}");
    assert_eq!(again["section"]["reserved"], 1 << 20, "the file's size, not --size");
    let (code, _, err) = run(&dir, &["-d", "fsb", "create", "q", "--size", "64K", "--kind", "queue", "--file", f]);
    assert_ne!(code, 0);
    assert!(err.contains("--file"), "{err}");
    let (code, _, err) = run(&dir, &["domain", "rm", "fsb"]);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_file(&file);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{left:?} in {d}");
    let _ = std::fs::remove_dir(&dir);
}
