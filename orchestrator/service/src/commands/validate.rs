//! `orchestrator validate FILE...`

use anyhow::bail;
use saga_engine::Definitions;

use crate::cli::ValidateArgs;
use crate::definitions;

pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let (files, read_errors) = definitions::read_all(&args.files);
    let mut failures = read_errors.len();
    for error in &read_errors {
        eprintln!("{error}");
    }
    match definitions::parse(&files) {
        Ok(_) => {
            // The set is valid, so each file is valid on its own: parse it again to say which
            // file each saga came from.
            for file in &files {
                let defs = Definitions::parse(&file.name, &file.text)?;
                for saga in &defs.sagas {
                    println!(
                        "ok  {} ({} step{}, version {}) in {}",
                        saga.name,
                        saga.steps.len(),
                        if saga.steps.len() == 1 { "" } else { "s" },
                        saga.version,
                        file.name
                    );
                }
            }
        }
        Err(errors) => {
            failures += errors.len();
            for error in &errors {
                eprintln!("{error}");
            }
        }
    }
    if failures > 0 {
        bail!(
            "{failures} error{} in the saga definitions",
            if failures == 1 { "" } else { "s" }
        );
    }
    Ok(())
}
