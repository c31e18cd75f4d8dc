//! `orchestrator definitions` and `orchestrator prune-definitions`: the definition versions kept
//! in the database.

use anyhow::Context;
use chrono::{DateTime, Utc};
use orchestrator::store::{DefinitionVersion, Pruned, Store};

use crate::cli::{DefinitionsArgs, Format, PruneDefinitionsArgs};

pub fn list(args: DefinitionsArgs) -> anyhow::Result<()> {
    orchestrator::telemetry::init();
    let versions = block_on(async {
        let store = Store::connect(&args.database_url)
            .await
            .context("cannot open the database")?;
        Ok(store.definition_versions().await?)
    })?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&versions)?),
        Format::Text => print!("{}", table(&versions)),
    }
    Ok(())
}

pub fn prune(args: PruneDefinitionsArgs) -> anyhow::Result<()> {
    orchestrator::telemetry::init();
    let refused = block_on(async {
        let store = Store::connect(&args.database_url)
            .await
            .context("cannot open the database")?;
        let versions = store.definition_versions().await?;
        let stored = |v: &&DefinitionVersion| v.stored;
        let chosen: Vec<&DefinitionVersion> = if args.all_unused {
            versions
                .iter()
                .filter(stored)
                .filter(|v| !v.current && v.in_flight == 0)
                .collect()
        } else {
            versions
                .iter()
                .filter(stored)
                .filter(|v| args.versions.contains(&v.version))
                .collect()
        };
        let mut refused = 0;
        for wanted in &args.versions {
            if !chosen.iter().any(|v| &v.version == wanted) {
                refused += 1;
                println!("{wanted}: no such stored version");
            }
        }
        for v in chosen {
            let what = format!("{} {}", v.name, v.version);
            match store.prune_definition(&v.name, &v.version).await? {
                Pruned::Deleted => println!("{what}: pruned"),
                Pruned::NotFound => println!("{what}: already gone"),
                Pruned::InFlight(n) => {
                    refused += 1;
                    println!("{what}: kept, {n} saga(s) still run on it");
                }
                Pruned::Loaded => {
                    refused += 1;
                    println!("{what}: kept, the last orchestrator to start loaded it");
                }
            }
        }
        anyhow::Ok(refused)
    })?;
    if refused > 0 {
        anyhow::bail!("{refused} version(s) not pruned");
    }
    Ok(())
}

fn block_on<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")?
        .block_on(work)
}

fn table(versions: &[DefinitionVersion]) -> String {
    let when = |t: Option<DateTime<Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
    };
    let mut out = format!(
        "{:<24} {:<16} {:<8} {:>9} {:>7}  {:<19}  {:<19}  STEPS\n",
        "SAGA", "VERSION", "", "IN FLIGHT", "SAGAS", "FIRST USED", "LAST USED"
    );
    for v in versions {
        let state = match (v.current, v.stored) {
            (true, _) => "current",
            (false, true) => "kept",
            (false, false) => "unstored",
        };
        let line = format!(
            "{:<24} {:<16} {:<8} {:>9} {:>7}  {:<19}  {:<19}  {}",
            v.name,
            v.version,
            state,
            v.in_flight,
            v.sagas,
            when(v.first_used),
            when(v.last_used),
            v.steps.join(" → ")
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
