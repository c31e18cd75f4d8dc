//! `orchestrator graph FILE --saga NAME`

use anyhow::bail;

use crate::cli::GraphArgs;
use crate::definitions;

pub fn run(args: GraphArgs) -> anyhow::Result<()> {
    let defs = definitions::load(std::slice::from_ref(&args.file))?;
    let Some(saga) = defs.get(&args.saga) else {
        let known: Vec<String> = defs.sagas.iter().map(|s| format!("`{}`", s.name)).collect();
        bail!(
            "unknown saga `{}` in {}; known sagas: {}",
            args.saga,
            args.file.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    print!("{}", saga_engine::graph::mermaid(saga));
    Ok(())
}
