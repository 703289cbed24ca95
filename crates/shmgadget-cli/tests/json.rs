//! Every command's `--json` output against the schema of docs/cli-json.md: each key present,
//! in the documented order, with the documented type; addresses `"0x…"`, modes `"0600"`; lists
//! of objects; errors as `{"error": {"kind", "message"}}` with the usual exit status.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The type of one value.
#[derive(Clone, Copy)]
enum T {
    Str,
    /// `"0x"` and hex digits.
    Addr,
    /// Four octal digits.
    Mode,
    U64,
    I64,
    F64,
    Bool,
    /// `null` or the type.
    Opt(&'static T),
    /// A list of strings.
    Strs,
    /// A list of objects of this shape.
    List(&'static [(&'static str, T)]),
    /// An object of this shape.
    Obj(&'static [(&'static str, T)]),
    /// Any object (a library struct with its own documented keys, such as heap statistics).
    AnyObj,
}

type Shape = &'static [(&'static str, T)];

/// A JSON value that keeps its object keys in the order printed (`serde_json::Value` sorts
/// them without the `preserve_order` feature), so the test can check the documented order.
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// The keys of `v` in the order the command printed them.
fn printed_order(v: &Value) -> Vec<String> {
    // serde_json prints an object's keys in the map's order and, with `Value`'s sorted map,
    // re-reading loses the printed order; so the raw text of each object is kept alongside.
    RAW.with(|raw| {
        let raw = raw.borrow();
        let text = raw.get(&v.to_string()).cloned().unwrap_or_default();
        serde_json::from_str::<Keys>(&text).map(|k| k.0).unwrap_or_default()
    })
}

thread_local! {
    /// Compact text of each object (as `Value` prints it) → its text as the command printed it.
    static RAW: std::cell::RefCell<std::collections::HashMap<String, String>> = Default::default();
}

/// Records the printed text of every object in `text`, keyed by its `Value` form.
fn remember_objects(text: &str) {
    // Every object's raw text, by walking the text with a brace matcher that skips strings.
    let b = text.as_bytes();
    let mut stack = Vec::new();
    let (mut i, mut in_str) = (0, false);
    while i < b.len() {
        match (in_str, b[i]) {
            (true, b'\\') => i += 1,
            (true, b'"') | (false, b'"') => in_str = !in_str,
            (false, b'{') => stack.push(i),
            (false, b'}') => {
                let start = stack.pop().unwrap();
                let raw = &text[start..=i];
                let v: Value = serde_json::from_str(raw).unwrap();
                RAW.with(|m| m.borrow_mut().insert(v.to_string(), raw.to_owned()));
            }
            _ => {}
        }
        i += 1;
    }
}

fn check(v: &Value, t: T, at: &str) {
    let ok = match t {
        T::Str => v.is_string(),
        T::Addr => v.as_str().is_some_and(|s| {
            s.strip_prefix("0x").is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        }),
        T::Mode => v.as_str().is_some_and(|s| s.len() == 4 && s.chars().all(|c| ('0'..='7').contains(&c))),
        T::U64 => v.is_u64(),
        T::I64 => v.is_i64(),
        T::F64 => v.is_number(),
        T::Bool => v.is_boolean(),
        T::Opt(inner) => {
            if !v.is_null() {
                check(v, *inner, at);
            }
            true
        }
        T::Strs => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        T::List(shape) => {
            let a = v.as_array().unwrap_or_else(|| panic!("{at}: expected a list, found {v}"));
            for (i, e) in a.iter().enumerate() {
                object(e, shape, &format!("{at}[{i}]"));
            }
            true
        }
        T::Obj(shape) => {
            object(v, shape, at);
            true
        }
        T::AnyObj => v.is_object(),
    };
    assert!(ok, "{at}: {v} does not have the documented type");
}

/// Checks every key of `shape` is there, in that order, and nothing else.
fn object(v: &Value, shape: Shape, at: &str) {
    let o = v.as_object().unwrap_or_else(|| panic!("{at}: expected an object, found {v}"));
    let want: Vec<&str> = shape.iter().map(|(k, _)| *k).collect();
    let mut sorted: Vec<&str> = o.keys().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut want_sorted = want.clone();
    want_sorted.sort_unstable();
    assert_eq!(sorted, want_sorted, "{at}: keys");
    assert_eq!(printed_order(v), want, "{at}: keys in the documented order");
    for (k, t) in shape {
        check(&o[*k], *t, &format!("{at}.{k}"));
    }
}

const PEER: Shape = &[("pid", T::U64), ("alive", T::Bool)];
const QUEUE: Shape = &[
    ("kind", T::Str),
    ("capacity", T::U64),
    ("fill", T::U64),
    ("sent", T::U64),
    ("received", T::U64),
    ("senders", T::List(PEER)),
    ("receivers", T::List(PEER)),
    ("blocked_senders", T::U64),
    ("blocked_receivers", T::U64),
];
const SECTION: Shape = &[
    ("name", T::Str),
    ("domain", T::Str),
    ("kind", T::Str),
    ("lifetime", T::Str),
    ("address", T::Addr),
    ("end", T::Addr),
    ("reserved", T::U64),
    ("committed", T::U64),
    ("resident", T::Opt(&T::U64)),
    ("owner_uid", T::U64),
    ("mode", T::Mode),
    ("generation", T::U64),
    ("created_at", T::U64),
    ("creator_pid", T::U64),
    ("object", T::Str),
    ("file", T::Opt(&T::Str)),
    ("page_size", T::U64),
    ("queue", T::Opt(&T::Obj(QUEUE))),
    ("queue_error", T::Opt(&T::Str)),
];
const DAMAGED: Shape = &[("slot", T::U64), ("name", T::Str), ("generation", T::U64), ("problem", T::Str)];
const TUNNEL: Shape = &[
    ("section", T::Str),
    ("end", T::Str),
    ("key", T::Str),
    ("alive", T::Bool),
    ("pid", T::Opt(&T::U64)),
    ("forwarded", T::Opt(&T::U64)),
    ("per_s", T::Opt(&T::F64)),
    ("in_flight", T::Opt(&T::U64)),
    ("error", T::Opt(&T::Str)),
];
const LS: Shape = &[
    ("domain", T::Str),
    ("sections", T::List(SECTION)),
    ("damaged", T::List(DAMAGED)),
    ("problems", T::Strs),
    ("tunnels", T::List(TUNNEL)),
];
const PROCESS: Shape = &[("pid", T::U64), ("uid", T::U64), ("attached_at", T::U64), ("alive", T::Bool)];
const DOMAIN: Shape = &[
    ("name", T::Str),
    ("status", T::Str),
    ("error", T::Opt(&T::Str)),
    ("window_base", T::Opt(&T::Addr)),
    ("window_end", T::Opt(&T::Addr)),
    ("window_size", T::Opt(&T::U64)),
    ("mode", T::Opt(&T::Mode)),
    ("created_at", T::Opt(&T::U64)),
    ("max_sections", T::Opt(&T::U64)),
    ("max_procs", T::Opt(&T::U64)),
    ("sections", T::Opt(&T::U64)),
    ("reserved", T::Opt(&T::U64)),
    ("resident", T::Opt(&T::U64)),
    ("processes", T::List(PROCESS)),
    ("damaged", T::List(DAMAGED)),
    ("problems", T::Strs),
    ("overlaps", T::List(&[("domain", T::Str), ("window_base", T::Addr), ("window_end", T::Addr)])),
];
const DOMAINS: Shape = &[("shm_dir", T::Str), ("domains", T::List(DOMAIN))];
const CREATE: Shape =
    &[("domain", T::Str), ("domain_created", T::Bool), ("section", T::Obj(SECTION)), ("removed_on_exit", T::Bool)];
const RM: Shape = &[("domain", T::Str), ("removed", T::List(&[("name", T::Str)]))];
const GC_SECTION: Shape = &[("domain", T::Str), ("section", T::Str), ("creator_pid", T::Opt(&T::U64))];
const GC_WHY: Shape = &[("domain", T::Str), ("reason", T::Str)];
const GC: Shape = &[
    ("dead_processes", T::List(&[("domain", T::Str), ("pid", T::U64)])),
    ("removed_unfinished", T::List(GC_SECTION)),
    ("removed_sections", T::List(GC_SECTION)),
    ("removed_domains", T::List(&[("domain", T::Str)])),
    ("removed_orphans", T::List(&[("object", T::Str)])),
    ("skipped", T::List(GC_WHY)),
    ("damaged", T::List(GC_WHY)),
    ("broken_locks", T::List(GC_WHY)),
];
const NAMED: Shape =
    &[("name", T::Str), ("kind", T::Str), ("address", T::Addr), ("size", T::U64), ("state", T::Opt(&T::AnyObj))];
const BLOCK: Shape = &[("offset", T::U64), ("size", T::U64), ("state", T::Str)];
const HEAP: Shape = &[
    ("name", T::Str),
    ("domain", T::Str),
    ("address", T::Addr),
    ("stats", T::AnyObj),
    ("named_objects", T::List(NAMED)),
    ("blocks", T::Opt(&T::List(BLOCK))),
    ("check", T::Opt(&T::Obj(&[("ok", T::Bool), ("problem", T::Opt(&T::Str))]))),
];
const DEMO: Shape = &[
    ("domain", T::Str),
    ("nodes", T::U64),
    ("steps", T::List(&[("role", T::Str), ("exit_code", T::Opt(&T::I64)), ("output", T::Strs)])),
    ("total_ms", T::F64),
    ("ok", T::Bool),
];
const DOMAIN_INFO: Shape = &[
    ("name", T::Str),
    ("window_base", T::Addr),
    ("window_end", T::Addr),
    ("window_size", T::U64),
    ("mode", T::Mode),
    ("owner_uid", T::U64),
    ("created_at", T::U64),
    ("kept", T::Bool),
    ("max_sections", T::U64),
    ("max_procs", T::U64),
    ("sections", T::U64),
    ("processes", T::U64),
    ("live_processes", T::U64),
    ("registry_bytes", T::U64),
];
const DOMAIN_RM: Shape = &[
    ("domain", T::Str),
    ("sections", T::List(&[("name", T::Str)])),
    ("objects", T::List(&[("object", T::Str)])),
    ("attached", T::List(&[("pid", T::U64)])),
];
const PROC: Shape =
    &[("pid", T::U64), ("uid", T::U64), ("command", T::Opt(&T::Str)), ("alive", T::Bool), ("attached_at", T::U64)];
const PS: Shape = &[("domain", T::Str), ("processes", T::List(PROC))];
const TOP: Shape = &[
    ("domain", T::Str),
    ("interval_ms", T::U64),
    ("processes", T::List(PROC)),
    (
        "sections",
        T::List(&[
            ("name", T::Str),
            ("kind", T::Str),
            ("reserved", T::U64),
            ("committed", T::U64),
            ("resident", T::Opt(&T::U64)),
        ]),
    ),
    (
        "heaps",
        T::List(&[
            ("name", T::Str),
            ("used", T::Opt(&T::U64)),
            ("free", T::Opt(&T::U64)),
            ("fragmentation", T::Opt(&T::F64)),
            ("allocs_per_s", T::Opt(&T::F64)),
            ("frees_per_s", T::Opt(&T::F64)),
            ("error", T::Opt(&T::Str)),
        ]),
    ),
    (
        "queues",
        T::List(&[
            ("name", T::Str),
            ("kind", T::Opt(&T::Str)),
            ("capacity", T::Opt(&T::U64)),
            ("fill", T::Opt(&T::U64)),
            ("sent_per_s", T::Opt(&T::F64)),
            ("received_per_s", T::Opt(&T::F64)),
            ("senders", T::List(PEER)),
            ("receivers", T::List(PEER)),
            ("blocked_senders", T::Opt(&T::U64)),
            ("blocked_receivers", T::Opt(&T::U64)),
            ("error", T::Opt(&T::Str)),
        ]),
    ),
    (
        "sync_objects",
        T::List(&[
            ("heap", T::Str),
            ("name", T::Str),
            ("kind", T::Str),
            ("holder_pid", T::Opt(&T::U64)),
            ("holder_alive", T::Opt(&T::Bool)),
            ("waiters", T::Opt(&T::U64)),
            ("state", T::Str),
        ]),
    ),
    ("tunnels", T::List(TUNNEL)),
];
const ERROR: Shape = &[("error", T::Obj(&[("kind", T::Str), ("message", T::Str)]))];

/// Runs `shmgadget args --json`; checks the exit status and that stdout is one JSON value of
/// `shape`; returns it.
fn json(dir: &Path, args: &[&str], code: i32, shape: Shape) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_shmgadget"))
        .args(args)
        .arg("--json")
        .env("SHMGADGET_SHM_DIR", dir)
        .env_remove("SHMGADGET_DOMAIN")
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "{args:?}: exit status\nstdout: {so}\nstderr: {se}");
    let v: Value = serde_json::from_str(&so).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {so}"));
    remember_objects(&so);
    object(&v, shape, &format!("{args:?}"));
    v
}

#[test]
fn every_command_prints_json_of_the_documented_schema_errors_included() {
    let dir = std::env::temp_dir().join(format!("shmgadget-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = &dir;

    let v = json(d, &["-d", "j", "create", "raw", "--size", "1M", "--commit", "64K", "--mode", "640"], 0, CREATE);
    assert_eq!(v["domain_created"], true);
    assert_eq!(v["section"]["mode"], "0640");
    assert_eq!(v["section"]["committed"], 65536);
    let v = json(d, &["-d", "j", "create", "h", "--size", "1M", "--kind", "heap"], 0, CREATE);
    assert_eq!(v["domain_created"], false);
    let v = json(d, &["-d", "j", "create", "q", "--size", "64K", "--kind", "queue"], 0, CREATE);
    assert_eq!(v["section"]["queue"]["capacity"], 65536);
    let v = json(d, &["-d", "j", "create", "t", "--size", "1M", "--transient"], 0, CREATE);
    assert_eq!(v["removed_on_exit"], true);

    let v = json(d, &["-d", "j", "ls"], 0, LS);
    let names: Vec<&str> = v["sections"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let q = v["sections"].as_array().unwrap().iter().find(|s| s["name"] == "q").unwrap();
    assert_eq!(q["queue"]["kind"], "bytes", "ls --json has the queue figures the table shows");
    let v = json(d, &["-d", "j", "info", "q"], 0, SECTION);
    assert_eq!(v, *q, "ls and info show a section the same way");
    json(d, &["-d", "j", "info", "raw"], 0, SECTION);
    json(d, &["-d", "j", "ps"], 0, PS);
    let v = json(d, &["-d", "j", "top", "--once"], 0, TOP);
    assert_eq!((v["heaps"][0]["name"].as_str(), v["queues"][0]["name"].as_str()), (Some("h"), Some("q")));
    json(d, &["-d", "j", "top"], 1, ERROR);
    json(d, &["completions", "fish"], 0, &[("what", T::Str), ("text", T::Str)]);
    json(d, &["man"], 0, &[("what", T::Str), ("text", T::Str)]);
    let v = json(d, &["-d", "j", "info"], 0, DOMAIN_INFO);
    assert_eq!(v["sections"], 3);
    let v = json(d, &["domain", "create", "jd", "--mode", "660", "--max-procs", "8"], 0, DOMAIN_INFO);
    assert_eq!((v["mode"].as_str(), v["max_procs"].as_u64(), v["kept"].as_bool()), (Some("0660"), Some(8), Some(true)));
    let v = json(d, &["domain", "create", "jd"], 1, ERROR);
    assert_eq!(v["error"]["kind"], "already_exists");
    json(d, &["-d", "jd", "create", "x", "--size", "4K"], 0, CREATE);
    let v = json(d, &["domain", "rm", "jd"], 0, DOMAIN_RM);
    assert_eq!(v["sections"][0]["name"], "x");
    let v = json(d, &["domains"], 0, DOMAINS);
    assert_eq!(v["domains"][0]["mode"], "0600");
    let v = json(d, &["-d", "j", "heap", "h", "--blocks", "--check"], 0, HEAP);
    assert_eq!(v["check"]["ok"], true);
    json(d, &["-d", "j", "heap", "h"], 0, HEAP);
    json(d, &["-d", "j", "gc"], 0, GC);
    json(d, &["gc", "--all"], 0, GC);
    json(d, &["demo", "--nodes", "1000"], 0, DEMO);

    // Errors: the same exit status as without --json, the error object on stdout.
    let v = json(d, &["-d", "j", "info", "nope"], 1, ERROR);
    assert_eq!(v["error"]["kind"], "not_found");
    let v = json(d, &["-d", "no-such-domain", "ls"], 1, ERROR);
    assert_eq!(v["error"]["kind"], "not_found");
    let v = json(d, &["-d", "j", "create", "raw", "--size", "1M"], 1, ERROR);
    assert_eq!(v["error"]["kind"], "already_exists");
    let v = json(d, &["-d", "j", "create", "x", "--size", "0"], 2, ERROR);
    assert_eq!(v["error"]["kind"], "usage");
    let v = json(d, &["no-such-command"], 2, ERROR);
    assert_eq!(v["error"]["kind"], "usage");

    for s in ["raw", "h", "q"] {
        let v = json(d, &["-d", "j", "rm", s], 0, RM);
        assert_eq!(v["removed"][0]["name"], s);
    }
    json(d, &["-d", "j", "rm", "raw"], 1, ERROR);
    json(d, &["-d", "j", "rm", "-f", "raw", "other"], 0, RM);
    let left: Vec<_> = std::fs::read_dir(d).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir(d).unwrap();
}
