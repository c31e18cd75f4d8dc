//! `orchestrator`: the saga orchestrator's command line. Each subcommand lives in
//! `commands/`; this file only parses the arguments and turns the outcome into an exit code.

mod cli;
mod commands;
mod definitions;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: glibc's was a fifth of the CPU of the benchmark's
/// process under load, and kept what a burst allocated unless told to map and trim eagerly.
/// mimalloc gives freed memory back on its own (the README's performance section has both
/// figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
