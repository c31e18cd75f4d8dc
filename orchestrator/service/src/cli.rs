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
    /// Explore every outcome of the sagas in a file (within bounds) and check the saga
    /// invariants on every path; exit 1 with a witness when one breaks.
    Check(CheckArgs),
    /// Run the orchestrator: drive sagas over RabbitMQ, serve the HTTP API.
    // Boxed: its many options would make every command as large as this one.
    Run(Box<RunArgs>),
    /// Rebuild the read model (the `sagas` table) from the event log alone.
    Rebuild(RebuildArgs),
    /// List the definition versions in the database, with the sagas that run on each.
    Definitions(DefinitionsArgs),
    /// Delete stored definition versions that no saga needs any more.
    PruneDefinitions(PruneDefinitionsArgs),
    /// Print the HTTP API's OpenAPI 3.1 document (what `GET /openapi.json` serves).
    Openapi,
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Validate(args) => commands::validate::run(args),
            Command::Graph(args) => commands::graph::run(args),
            Command::Check(args) => commands::check::run(args),
            Command::Run(args) => commands::run::run(*args),
            Command::Rebuild(args) => commands::rebuild::run(args),
            Command::Definitions(args) => commands::definitions::list(args),
            Command::PruneDefinitions(args) => commands::definitions::prune(args),
            Command::Openapi => commands::openapi::run(),
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

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The definition file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Only this saga [default: every saga in the file].
    #[arg(long, value_name = "NAME")]
    pub saga: Option<String>,
    /// Faults per path: business failures, retryable errors, lost replies, timeouts racing a
    /// reply, the deadline passing, duplicate deliveries, operator aborts, in all.
    #[arg(long, default_value_t = saga_engine::check::Bounds::default().faults)]
    pub faults: u32,
    /// Moves per path at most; a longer path is reported as truncated.
    #[arg(long, default_value_t = saga_engine::check::Bounds::default().max_moves)]
    pub max_moves: usize,
    /// Do not try an operator abort at each point.
    #[arg(long)]
    pub no_abort: bool,
    /// Text for people, or JSON (one object per saga, in an array).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// How a command prints what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Where the saga state lives. SQLite (a file in the working directory) is the embedded
/// default; use PostgreSQL in production.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://orchestrator.db?mode=rwc";
use orchestrator::relay::PackCommands;
use orchestrator::runtime::PublishEvents;
pub use saga_amqp::DEFAULT_AMQP_URL;
use saga_amqp::{QueueType, SecretUrl};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The saga definition file.
    #[arg(long, env = "SAGA_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
    /// The RabbitMQ broker; for the nodes of one cluster, repeat the flag or give a
    /// comma-separated list. The first node that answers is used, the next when it goes away.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true,
          value_delimiter = ',', action = clap::ArgAction::Append)]
    pub amqp_url: Vec<SecretUrl>,
    /// The type of every queue declared: quorum (replicated; the default) or classic (for a
    /// broker that still has the classic queues of an older version). The same on every
    /// process of the system.
    #[arg(long, env = "QUEUE_TYPE", default_value_t = QueueType::Quorum)]
    pub queue_type: QueueType,
    /// Which saga events are published to the `saga.events` exchange: terminal (completed,
    /// compensated, compensation_failed, completion_failed: one message per saga), all (every
    /// event, about eight per saga, for a subscriber following each step), or none. Every
    /// event is recorded in the event log either way.
    #[arg(long, env = "PUBLISH_EVENTS", default_value_t = PublishEvents::default())]
    pub publish_events: PublishEvents,
    /// The participants whose commands go several to a message (`saga.step_commands`), each
    /// such message answered by one with the replies (`saga.step_replies`): `none`, `all`, or
    /// participant names separated by commas. Only for participants that take packed commands,
    /// as every one built on the participant SDK does; it saves the broker most of a message
    /// per step under load.
    #[arg(long, env = "PACK_COMMANDS", default_value_t = PackCommands::default())]
    pub pack_commands: PackCommands,
    /// A PEM file of CA certificates to trust for an `amqps://` broker, besides the built-in
    /// (Mozilla) roots: for a broker certificate signed by a private CA.
    #[arg(long, env = "AMQP_CA_FILE", value_name = "FILE")]
    pub amqp_ca_file: Option<PathBuf>,
    /// `sqlite://FILE?mode=rwc` or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: SecretUrl,
    /// PostgreSQL: the most connections the orchestrator opens (SQLite ignores it).
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = orchestrator::store::DEFAULT_POOL_SIZE,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub database_pool_size: u32,
    /// Threads that run the orchestrator's tasks: 1 runs them all on one thread, which on two
    /// cores shared with the broker and the database did the most sagas/s; more spreads them
    /// over that many threads, for a host whose cores are the orchestrator's own.
    #[arg(long, env = "RUNTIME_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub runtime_threads: u16,
    /// Address of the HTTP API.
    #[arg(long = "http", env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http: std::net::SocketAddr,
    /// Connection name shown in the RabbitMQ management UI (default: orchestrator@HOST:PID).
    #[arg(long, env = "CONNECTION_NAME")]
    pub connection_name: Option<String>,
    /// Unacknowledged replies the orchestrator may hold at once.
    #[arg(long, env = "PREFETCH", default_value_t = 256)]
    pub prefetch: u16,
    /// Sagas in flight for longer than this are counted in the `saga_long_running` metric.
    #[arg(long, env = "LONG_RUNNING_THRESHOLD", default_value = "5m", value_parser = humantime::parse_duration)]
    pub long_running_threshold: std::time::Duration,
    /// How long the inbox keeps the id of a handled reply, to spot its redeliveries.
    #[arg(long, env = "INBOX_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub inbox_retention: std::time::Duration,
    /// HTTP API bearer tokens: a file of `NAME ROLE TOKEN` lines, ROLE `read` or `operate`.
    #[arg(long, env = "TOKENS_FILE", value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
    /// HTTP API bearer tokens: `NAME ROLE TOKEN` entries separated by `;` or newlines. Prefer
    /// the variable or --tokens-file: a command line is visible to every user of the machine.
    #[arg(
        long,
        env = "API_TOKENS",
        value_name = "TOKENS",
        hide_env_values = true
    )]
    pub api_tokens: Option<orchestrator::auth::TokenText>,
    /// Serve /metrics without a token (with tokens set, it needs the `read` role otherwise).
    #[arg(long, env = "METRICS_OPEN")]
    pub metrics_open: bool,
    /// The RabbitMQ management UI as a browser reaches it: the web view (/ui) links a saga's
    /// participants to their queues' pages there (in the vhost of the AMQP URL).
    #[arg(long, env = "MANAGEMENT_URL", default_value = orchestrator::ui::DEFAULT_MANAGEMENT_URL)]
    pub management_url: String,
    /// Serve the HTTP API on a non-loopback address with no tokens configured.
    #[arg(long, env = "INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// The database whose read model to rebuild.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: SecretUrl,
}

#[derive(Debug, Args)]
pub struct DefinitionsArgs {
    /// The orchestrator's database.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: SecretUrl,
    /// A table for people, or JSON (what `GET /definitions` answers).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct PruneDefinitionsArgs {
    /// The orchestrator's database.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: SecretUrl,
    /// Versions (content hashes, as `orchestrator definitions` lists them) to delete; each is
    /// refused while a saga runs on it or the last orchestrator to start loaded it.
    #[arg(value_name = "VERSION", required_unless_present = "all_unused")]
    pub versions: Vec<String>,
    /// Every stored version that no saga runs on and the last start did not load.
    #[arg(long, conflicts_with = "versions")]
    pub all_unused: bool,
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

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let args = ["orchestrator", "run", "--config", "sagas.yaml"];
        match Cli::try_parse_from(args.iter().chain(extra))?.command {
            Command::Run(args) => Ok(*args),
            other => panic!("not `run`: {other:?}"),
        }
    }

    #[test]
    fn the_runtime_threads_are_a_flag_with_a_default_of_one() {
        // RUNTIME_THREADS may be set around the tests: the flag wins over it.
        assert_eq!(
            run_args(&["--runtime-threads", "4"])
                .unwrap()
                .runtime_threads,
            4
        );
        if std::env::var_os("RUNTIME_THREADS").is_none() {
            assert_eq!(run_args(&[]).unwrap().runtime_threads, 1);
        }
        assert!(run_args(&["--runtime-threads", "0"]).is_err());
    }

    #[test]
    fn the_database_pool_size_is_a_flag_with_a_default() {
        // DATABASE_POOL_SIZE may be set around the tests: the flag wins over it.
        assert_eq!(
            run_args(&["--database-pool-size", "3"])
                .unwrap()
                .database_pool_size,
            3
        );
        if std::env::var_os("DATABASE_POOL_SIZE").is_none() {
            assert_eq!(run_args(&[]).unwrap().database_pool_size, 10);
        }
        assert!(run_args(&["--database-pool-size", "0"]).is_err());
    }

    #[test]
    fn the_broker_list_is_a_repeated_flag_or_a_comma_separated_list() {
        let (a, b) = (
            "amqp://app:pw@rabbit1:5672/%2f",
            "amqp://app:pw@rabbit2:5672/%2f",
        );
        let joined = format!("{a},{b}");
        for extra in [
            vec!["--amqp-url", a, "--amqp-url", b],
            vec!["--amqp-url", &joined],
        ] {
            let urls: SecretUrl = run_args(&extra).unwrap().amqp_url.into_iter().collect();
            assert_eq!(urls.expose(), joined, "{extra:?}");
        }
    }

    #[test]
    fn the_queue_type_is_quorum_unless_classic_is_asked_for() {
        if std::env::var_os("QUEUE_TYPE").is_none() {
            assert_eq!(run_args(&[]).unwrap().queue_type, QueueType::Quorum);
        }
        let classic = run_args(&["--queue-type", "classic"]).unwrap();
        assert_eq!(classic.queue_type, QueueType::Classic);
        let err = run_args(&["--queue-type", "stream"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("quorum (the default) or classic"), "{err}");
    }

    #[test]
    fn printing_the_arguments_never_shows_a_password_or_a_token() {
        let token = "t0ken-t0ken-t0ken-t0ken-t0ken-t0ken";
        let args = run_args(&[
            "--amqp-url",
            "amqp://app:amqp-pw@rabbit:5672/%2f",
            "--database-url",
            "postgres://app:db-pw@pg:5432/app",
            "--api-tokens",
            &format!("ops operate {token}"),
        ])
        .unwrap();
        let shown = format!("{args:?}");
        for secret in ["amqp-pw", "db-pw", token] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("amqp://app:***@rabbit:5672/%2f"), "{shown}");
        assert!(shown.contains("postgres://app:***@pg:5432/app"), "{shown}");
    }
}
