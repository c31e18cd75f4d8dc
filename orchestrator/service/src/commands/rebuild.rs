//! `orchestrator rebuild`: recovery by replay.

use anyhow::Context;
use orchestrator::store::Store;

use crate::cli::RebuildArgs;

pub fn run(args: RebuildArgs) -> anyhow::Result<()> {
    orchestrator::telemetry::init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let rebuilt = runtime.block_on(async {
        let store = Store::connect(&args.database_url)
            .await
            .context("cannot open the database")?;
        store.rebuild_read_model().await.context("rebuild failed")
    })?;
    println!("rebuilt the read model of {rebuilt} sagas from the event log");
    Ok(())
}
