//! `orchestrator`: the saga orchestrator's command line. Each subcommand lives in
//! `commands/`; this file only parses the arguments and turns the outcome into an exit code.

mod cli;
mod commands;
mod definitions;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    give_memory_back();
    let cli = cli::Cli::parse();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's allocator keeps what a burst of sagas allocated, spread over up to 8 arenas per
/// core, long after the burst. Two arenas, and large blocks mapped and trimmed eagerly, bring
/// the orchestrator back near its steady-state footprint once a burst is over (see the
/// README's performance section for the figures).
fn give_memory_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists, as glibc requires for these settings to apply everywhere.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 * 1024);
    }
}
