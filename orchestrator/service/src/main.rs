//! `orchestrator`: the saga orchestrator's command line. Each subcommand lives in
//! `commands/`; this file only parses the arguments and turns the outcome into an exit code.

mod cli;
mod commands;
mod definitions;

use std::process::ExitCode;

use clap::Parser;

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
