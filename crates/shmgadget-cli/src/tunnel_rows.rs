//! Tunnel endpoints for `ls` and `top`: the stats sections a running `shmgadget tunnel`
//! end publishes (`<queue>.tunnel-export` / `<queue>.tunnel-import`, see
//! `shmgadget_tunnel::stats`). Without the `tunnel` feature there are none to read.

use serde::Serialize;
use shmgadget::Domain;
use shmgadget::inspect::DomainReport;

/// One tunnel end, as `ls --json` and `top --json` show it.
#[derive(Serialize, Clone, Debug)]
pub struct TunnelEnd {
    /// The stats section.
    pub section: String,
    /// `"export"` or `"import"`.
    pub end: &'static str,
    /// The zenoh key prefix it uses.
    pub key: String,
    /// Whether the end is running (a dead or stopped end shows no numbers).
    pub alive: bool,
    pub pid: Option<u32>,
    /// Messages acknowledged (exporter) or written (importer).
    pub forwarded: Option<u64>,
    /// Messages per second over the end's last second.
    pub per_s: Option<f64>,
    /// Messages sent and not yet acknowledged (exporter).
    pub in_flight: Option<u64>,
    /// Why the section cannot be read.
    pub error: Option<String>,
}

/// The tunnel ends among `report`'s sections.
#[cfg(feature = "tunnel")]
pub fn ends(domain: &Domain, report: &DomainReport) -> Vec<TunnelEnd> {
    report
        .sections
        .iter()
        .filter(|s| s.name.ends_with(".tunnel-export") || s.name.ends_with(".tunnel-import"))
        .map(|s| {
            let info = domain
                .open_section(&s.name)
                .map_err(|e| e.to_string())
                .and_then(|sec| shmgadget_tunnel::stats::inspect(domain, &sec).map_err(|e| e.to_string()));
            match info {
                Ok(Some(i)) => TunnelEnd {
                    section: s.name.clone(),
                    end: i.end,
                    key: i.key,
                    alive: i.pid.is_some(),
                    pid: i.pid,
                    forwarded: i.forwarded,
                    per_s: i.rate,
                    in_flight: i.in_flight,
                    error: None,
                },
                Ok(None) => unreachable!("filtered by name"),
                Err(e) => TunnelEnd {
                    section: s.name.clone(),
                    end: if s.name.ends_with("export") { "export" } else { "import" },
                    key: String::new(),
                    alive: false,
                    pid: None,
                    forwarded: None,
                    per_s: None,
                    in_flight: None,
                    error: Some(e),
                },
            }
        })
        .collect()
}

/// Without the `tunnel` feature: none.
#[cfg(not(feature = "tunnel"))]
pub fn ends(_domain: &Domain, _report: &DomainReport) -> Vec<TunnelEnd> {
    Vec::new()
}

/// One line of `ls`.
pub fn describe(t: &TunnelEnd) -> String {
    if let Some(e) = &t.error {
        return format!("tunnel {} ({}): cannot be read: {e}", t.section, t.end);
    }
    match t.pid {
        Some(pid) => format!(
            "tunnel {} ({}, pid {pid}): key {}, {} forwarded, {:.0} msg/s, {} in flight",
            t.section,
            t.end,
            t.key,
            t.forwarded.unwrap_or(0),
            t.per_s.unwrap_or(0.0),
            t.in_flight.unwrap_or(0)
        ),
        None => format!("tunnel {} ({}): DEAD or stopped (key {})", t.section, t.end, t.key),
    }
}
