//! `shmgadget ps`: the processes attached to a domain, with the command name `/proc` gives
//! for each live one.

use std::process::ExitCode;

use serde::Serialize;
use shmgadget::inspect::{self, ProcessInfo};

use crate::domain_cmd::format_time;
use crate::out::outln;

/// One attached process, as `ps` and `top` show it.
#[derive(Serialize, Clone)]
pub struct Proc {
    pub pid: u32,
    pub uid: u32,
    /// From `/proc/PID/comm` for a live process in this pid namespace; `null` for a dead one
    /// (its pid may belong to someone else by now) or one `/proc` does not show.
    pub command: Option<String>,
    pub alive: bool,
    pub attached_at: u64,
}

impl Proc {
    pub fn new(p: &ProcessInfo) -> Proc {
        Proc {
            pid: p.pid,
            uid: p.uid,
            command: if p.alive { command_name(p.pid) } else { None },
            alive: p.alive,
            attached_at: p.attached_at,
        }
    }
}

/// `/proc/PID/comm`, trimmed. A pid recorded in another pid namespace (a container) may name
/// another process here, or none: liveness comes from the registry's token, never from this.
pub fn command_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_owned())
}

#[derive(Serialize)]
struct PsOut {
    domain: String,
    processes: Vec<Proc>,
}

pub fn run(cli: &crate::Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let report = inspect::inspect_domain(&cli.domain, cli.shm_dir.as_deref())?;
    let procs: Vec<Proc> = report.processes.iter().map(Proc::new).collect();
    if cli.json {
        crate::json::print(&PsOut { domain: report.name.clone(), processes: procs });
        return Ok(ExitCode::SUCCESS);
    }
    if procs.is_empty() {
        outln!("no process is attached to domain {:?}", report.name);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = crate::table(&["pid", "command", "uid", "state", "attached since"]);
    for p in &procs {
        t.add_row(vec![
            p.pid.to_string(),
            p.command.clone().unwrap_or_else(|| "-".into()),
            p.uid.to_string(),
            if p.alive { "alive".to_owned() } else { "dead (not detached; `shmgadget gc` clears it)".to_owned() },
            format_time(p.attached_at),
        ]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}
