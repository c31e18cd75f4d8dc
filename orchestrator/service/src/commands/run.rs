//! `orchestrator run`: the service.

use anyhow::Context;
use orchestrator::auth::AuthConfig;
use orchestrator::service::{self, ServiceConfig};
use tracing::info;

use crate::cli::RunArgs;
use crate::definitions;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    orchestrator::telemetry::init_service("orchestrator");
    let definitions = definitions::load(std::slice::from_ref(&args.config))?;
    let connection_name = args
        .connection_name
        .unwrap_or_else(|| saga_amqp::default_connection_name("orchestrator"));
    let auth = AuthConfig::load(
        args.tokens_file.as_deref(),
        args.api_tokens.as_ref(),
        args.metrics_open,
        args.insecure_no_auth,
    )?;
    let config = ServiceConfig {
        amqp_url: args.amqp_url.into_iter().collect(),
        queue_type: args.queue_type,
        publish_events: args.publish_events,
        pack_commands: args.pack_commands,
        database_url: args.database_url,
        database_pool_size: args.database_pool_size,
        http: args.http,
        connection_name,
        prefetch: args.prefetch,
        long_running_threshold: args.long_running_threshold,
        inbox_retention: args.inbox_retention,
        amqp_tls: saga_amqp::Tls::from_ca_file(args.amqp_ca_file.as_deref())?,
        auth,
        management_url: args.management_url,
    };
    let runtime = saga_amqp::async_runtime(args.runtime_threads.into())
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let shutdown = saga_amqp::shutdown_on_signal();
        info!(sagas = definitions.sagas.len(), config = %args.config.display(), "starting");
        service::serve(definitions, config, shutdown).await
    });
    saga_amqp::trace::shutdown();
    result
}
