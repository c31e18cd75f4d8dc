//! Logging for every binary of the project: human-readable by default, JSON lines with
//! `LOG_FORMAT=json`. `RUST_LOG` filters (default `info`); the crates that log every SQL
//! statement or every AMQP frame (sqlx, sea-orm, lapin) are held at `warn` unless `RUST_LOG`
//! names them, so `RUST_LOG=info` does not flood the log.
//!
//! Services also export their spans over OTLP when an endpoint is configured (see
//! `saga_amqp::trace`).
//!
//! The example participants compile this same file (`#[path]` in
//! `participants/examples/src/cli.rs`), so it depends on `tracing-subscriber` and `saga-amqp`
//! only.

use tracing_subscriber::EnvFilter;

/// Crates held at `warn` unless `RUST_LOG` names them: sqlx logs every statement at INFO,
/// sea-orm (and its migrator) its own statements, lapin and amq-protocol connection chatter.
const QUIET: [&str; 4] = ["sqlx", "sea_orm", "lapin", "amq_protocol"];

/// The filter directives for a `RUST_LOG` value (`None` or blank: `info`): the user's
/// directives, then `<crate>=warn` for each quiet crate the user's directives do not name.
pub fn log_filter(rust_log: Option<&str>) -> String {
    let user = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let mut directives = vec![user.unwrap_or("info").to_owned()];
    for quiet in QUIET {
        if !user.is_some_and(|user| names_target(user, quiet)) {
            directives.push(format!("{quiet}=warn"));
        }
    }
    directives.join(",")
}

/// Whether one of the comma-separated `directives` (`target[span]=level`) is about `krate` or
/// one of its modules: `sqlx=info`, `sqlx::query=debug`.
fn names_target(directives: &str, krate: &str) -> bool {
    directives.split(',').any(|directive| {
        let target = directive
            .trim()
            .split(['=', '['])
            .next()
            .unwrap_or_default();
        target == krate || target.starts_with(&format!("{krate}::"))
    })
}

/// Installs the subscriber: JSON lines when `LOG_FORMAT=json`, text otherwise.
pub fn init() {
    init_with(json_from_env(), None, None);
}

/// Installs the subscriber, JSON lines or text. A second call (tests) keeps the first.
pub fn init_as(json: bool) {
    init_with(json, None, None);
}

/// [`init`] for a long-running service: also exports its spans over OTLP as `service` when an
/// endpoint is configured (`saga_amqp::trace`). Call `saga_amqp::trace::shutdown` on the way
/// out.
#[allow(dead_code)] // The example participants compile this file and call `init_service_as`.
pub fn init_service(service: &str) {
    init_with(json_from_env(), None, Some(service));
}

/// [`init_service`], JSON lines or text.
#[allow(dead_code)] // The orchestrator calls `init_service`.
pub fn init_service_as(json: bool, service: &str) {
    init_with(json, None, Some(service));
}

/// [`init`], with `RUST_LOG` defaulting to `default` rather than `info` (the benchmark's
/// `warn`, so that its figures do not include a line of text per message).
#[allow(dead_code)] // The example participants compile this file and do not call it.
pub fn init_quiet(default: &str) {
    init_with(json_from_env(), Some(default), None);
}

fn json_from_env() -> bool {
    std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"))
}

fn init_with(json: bool, default: Option<&str>, service: Option<&str>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .or(default.map(str::to_owned));
    let filter = || {
        EnvFilter::try_new(log_filter(rust_log.as_deref())).unwrap_or_else(|error| {
            eprintln!("RUST_LOG is not a valid filter ({error}); logging at info");
            EnvFilter::new(log_filter(None))
        })
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let mut layers = vec![if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter())
            .boxed()
    } else {
        fmt.with_filter(filter()).boxed()
    }];
    if let Some(service) = service {
        match saga_amqp::trace::otlp_layer(service) {
            Ok(Some(otlp)) => layers.push(otlp.with_filter(filter()).boxed()),
            Ok(None) => {}
            Err(error) => eprintln!("traces are not exported: {error}"),
        }
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_statements_stay_muted_whatever_the_level() {
        assert_eq!(
            log_filter(None),
            "info,sqlx=warn,sea_orm=warn,lapin=warn,amq_protocol=warn"
        );
        assert_eq!(
            log_filter(Some("info")),
            "info,sqlx=warn,sea_orm=warn,lapin=warn,amq_protocol=warn"
        );
        assert_eq!(
            log_filter(Some(" debug,orchestrator=trace ")),
            "debug,orchestrator=trace,sqlx=warn,sea_orm=warn,lapin=warn,amq_protocol=warn"
        );
    }

    #[test]
    fn a_crate_named_in_rust_log_gets_what_was_asked() {
        assert_eq!(
            log_filter(Some("info,sqlx=info")),
            "info,sqlx=info,sea_orm=warn,lapin=warn,amq_protocol=warn"
        );
        assert_eq!(
            log_filter(Some("warn,sqlx::query=debug,lapin=trace")),
            "warn,sqlx::query=debug,lapin=trace,sea_orm=warn,amq_protocol=warn"
        );
        // A crate whose name merely begins like a quiet one is not it.
        assert_eq!(
            log_filter(Some("sqlxish=info")),
            "sqlxish=info,sqlx=warn,sea_orm=warn,lapin=warn,amq_protocol=warn"
        );
    }

    #[test]
    fn the_filter_mutes_sqlx_at_info() {
        use tracing::Level;
        use tracing_subscriber::layer::SubscriberExt;

        // Lines the subscriber lets through, by target.
        #[derive(Clone, Default)]
        struct Seen(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0
                    .lock()
                    .unwrap()
                    .push(event.metadata().target().to_owned());
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(log_filter(Some("info"))))
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::event!(target: "sqlx::query", Level::INFO, "SELECT 1");
            tracing::event!(target: "sqlx::query", Level::WARN, "slow statement");
            tracing::event!(target: "orchestrator::runtime", Level::INFO, "saga started");
        });
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["sqlx::query", "orchestrator::runtime"],
            "the statement is muted; the warning and our own line are not"
        );
    }
}
