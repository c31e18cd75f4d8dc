//! The command-line interface: one variant of [`Command`] per subcommand, each with its own
//! argument struct, implemented in `commands/<name>.rs`. To add a subcommand, add a variant
//! here, its `Args` struct, and one arm in [`Command::run`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::commands;

/// The saga orchestrator: runs sagas defined in YAML over RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "orchestrator", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check saga definition files; print each saga with its version, or every error.
    Validate(ValidateArgs),
    /// Print one saga as a Mermaid flowchart: its steps, failures and compensations.
    Graph(GraphArgs),
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Validate(args) => commands::validate::run(args),
            Command::Graph(args) => commands::graph::run(args),
        }
    }
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Definition files, checked as one set: saga names must be unique across them.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// The definition file the saga is in.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The saga to draw.
    #[arg(long, value_name = "NAME")]
    pub saga: String,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn validate_needs_a_file() {
        assert!(Cli::try_parse_from(["orchestrator", "validate"]).is_err());
    }
}
