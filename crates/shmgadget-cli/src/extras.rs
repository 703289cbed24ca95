//! `shmgadget completions SHELL` and `shmgadget man`: generated from the command-line
//! definition itself (clap_complete, clap_mangen), so they cannot drift from it. And the
//! table style: box-drawing characters only on a UTF-8 terminal.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::CommandFactory;
use comfy_table::presets::{ASCII_FULL_CONDENSED, UTF8_FULL_CONDENSED};
use serde::Serialize;

use crate::out::outln;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Serialize)]
struct Generated {
    what: String,
    text: String,
}

/// Prints `text` (already ending in a newline) through the broken-pipe-safe writer.
fn print(text: &str) {
    outln!("{}", text.strip_suffix('\n').unwrap_or(text));
}

pub fn completions(json: bool, shell: Shell) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut buf = Vec::new();
    let mut cmd = crate::Cli::command();
    let (shell_gen, what) = match shell {
        Shell::Bash => (clap_complete::Shell::Bash, "bash"),
        Shell::Zsh => (clap_complete::Shell::Zsh, "zsh"),
        Shell::Fish => (clap_complete::Shell::Fish, "fish"),
    };
    clap_complete::generate(shell_gen, &mut cmd, "shmgadget", &mut buf);
    let text = String::from_utf8(buf)?;
    if json {
        crate::json::print(&Generated { what: format!("{what} completions"), text });
    } else {
        print(&text);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn man(json: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(crate::Cli::command()).render(&mut buf)?;
    // One page for the tool: each subcommand follows as a section of it, with its options.
    for sub in crate::Cli::command().get_subcommands().filter(|s| !s.is_hide_set()) {
        man_section(&mut buf, "shmgadget", sub)?;
    }
    let text = String::from_utf8(buf)?;
    if json {
        crate::json::print(&Generated { what: "man page (roff)".to_owned(), text });
    } else {
        print(&text);
    }
    Ok(ExitCode::SUCCESS)
}

/// Appends `.SH "SHMGADGET NAME"` with `cmd`'s description and options (and its own
/// subcommands', for `domain`) to `buf`.
fn man_section(buf: &mut Vec<u8>, parent: &str, cmd: &clap::Command) -> std::io::Result<()> {
    let title = format!("{parent} {}", cmd.get_name());
    let about = cmd.get_long_about().or(cmd.get_about()).map(|a| a.to_string()).unwrap_or_default();
    buf.extend_from_slice(format!(".SH \"{}\"\n{}\n", title.to_uppercase(), roff_escape(&about)).as_bytes());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render_options_section(&mut page)?;
    // Its own ".SH OPTIONS" heading and string definitions are the main page's already.
    for line in String::from_utf8_lossy(&page).lines() {
        if !(line.starts_with(".ie ") || line.starts_with(".el ") || line.starts_with(".SH ")) {
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        man_section(buf, &title, sub)?;
    }
    Ok(())
}

/// Text safe in a roff paragraph: backslashes and hyphens escaped, no line starting with a dot.
fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\e")
        .replace('-', "\\-")
        .lines()
        .map(|l| if l.starts_with(['.', '\'']) { format!("\\&{l}") } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether tables may use box-drawing characters: stdout is a terminal and the locale is
/// UTF-8 (`LC_ALL`, else `LC_CTYPE`, else `LANG`, as the C library decides). Anything else
/// (a pipe, a file, `LANG=C`) gets plain ASCII, which every terminal, pager and script reads.
pub fn utf8_tables() -> bool {
    if !std::io::stdout().is_terminal() {
        return false;
    }
    let locale = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.is_empty())
        .unwrap_or_default()
        .to_ascii_lowercase();
    locale.contains("utf-8") || locale.contains("utf8")
}

pub fn table_preset() -> &'static str {
    if utf8_tables() { UTF8_FULL_CONDENSED } else { ASCII_FULL_CONDENSED }
}
