//! `domains` flags windows that overlap (an explicit `--window-base` another user could not
//! check against root's unreadable registry), as text and as JSON, and automatic windows of
//! two users do not overlap. Needs root (acts as uid 65534); skipped otherwise.

mod common;

use common::{ShmDir, shmgadget as cli};

use std::os::unix::process::CommandExt;
use std::process::Output;

const NOBODY: u32 = 65534;

fn ok(o: Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

fn window(v: &serde_json::Value, name: &str) -> (u64, u64) {
    let d = v["domains"].as_array().unwrap().iter().find(|d| d["name"] == name).expect("listed");
    let hex = |k: &str| u64::from_str_radix(d[k].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    (hex("window_base"), hex("window_end"))
}

#[test]
fn domains_flags_an_overlap_made_on_purpose_and_two_users_windows_are_disjoint() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let dir = ShmDir::shared("winovl");
    let d = &dir.0;
    // Automatic windows: root's, then uid 65534's (who cannot read root's registry).
    ok(cli(d, &["domain", "create", "auto-root", "--window-size", "1G"]).output().unwrap());
    ok(cli(d, &["domain", "create", "auto-nobody", "--window-size", "1G"]).uid(NOBODY).gid(NOBODY).output().unwrap());
    // The same base on purpose: uid 65534 cannot see that root's domain uses it.
    ok(cli(d, &["domain", "create", "mine", "--window-size", "1G", "--window-base", "0x5b0000000000"])
        .output()
        .unwrap());
    ok(cli(d, &["domain", "create", "theirs", "--window-size", "1G", "--window-base", "0x5b0000000000"])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap());
    let v: serde_json::Value =
        serde_json::from_str(&ok(cli(d, &["domains", "--json"]).output().unwrap())).expect("JSON");
    let (a, b) = (window(&v, "auto-root"), window(&v, "auto-nobody"));
    assert!(a.1 <= b.0 || b.1 <= a.0, "automatic windows overlap: {a:x?} {b:x?}");
    let overlaps = |name: &str| -> Vec<String> {
        let d = v["domains"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap();
        d["overlaps"].as_array().unwrap().iter().map(|o| o["domain"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(overlaps("mine"), vec!["theirs".to_owned()], "{v}");
    assert_eq!(overlaps("theirs"), vec!["mine".to_owned()], "{v}");
    assert!(overlaps("auto-root").is_empty() && overlaps("auto-nobody").is_empty(), "{v}");
    let mine = v["domains"].as_array().unwrap().iter().find(|d| d["name"] == "mine").unwrap();
    assert_eq!(mine["overlaps"][0]["window_base"], "0x5b0000000000", "{v}");
    let text = ok(cli(d, &["domains"]).output().unwrap());
    assert!(text.contains("OVERLAPS"), "{text}");
    assert!(
        text.contains("domain \"mine\"'s window 0x5b0000000000-0x5b0040000000 overlaps domain \"theirs\""),
        "{text}"
    );
    assert!(!text.contains("domain \"auto-root\"'s window"), "{text}");
}
