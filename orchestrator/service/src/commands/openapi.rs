//! `orchestrator openapi`: the document `orchestrator/openapi.json` is committed from.

pub fn run() -> anyhow::Result<()> {
    let document = orchestrator::openapi::document();
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(())
}
