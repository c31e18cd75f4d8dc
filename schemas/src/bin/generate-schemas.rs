//! Writes the JSON Schema files generated from the contract types into `schemas/json/`.
//!
//! ```text
//! cargo run -p saga-schemas --bin generate-schemas            # (re)write the files
//! cargo run -p saga-schemas --bin generate-schemas -- --check # exit 1 if they drifted
//! ```
//!
//! An optional last argument writes to (or checks) another directory.

use std::path::PathBuf;
use std::process::ExitCode;

use saga_schemas::generate;

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!(
                    "usage: generate-schemas [--check] [DIR]\n\nDIR defaults to {}",
                    dir.display()
                );
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => {
                eprintln!("generate-schemas: unknown option `{other}`");
                return ExitCode::from(2);
            }
            other => dir = PathBuf::from(other),
        }
    }

    if check {
        match generate::check(&dir) {
            Ok(drift) if drift.is_empty() => {
                println!("schemas in {} are up to date", dir.display());
                ExitCode::SUCCESS
            }
            Ok(drift) => {
                for d in &drift {
                    eprintln!("{d}");
                }
                eprintln!("regenerate with: {}", generate::REGENERATE_COMMAND);
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("generate-schemas: reading {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        }
    } else {
        match generate::write_all(&dir) {
            Ok(changed) => {
                for path in &changed {
                    let what = if path.exists() { "wrote" } else { "removed" };
                    println!("{what} {}", path.display());
                }
                println!(
                    "{} schema files in {} ({} changed)",
                    generate::json_schemas().len(),
                    dir.display(),
                    changed.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("generate-schemas: writing {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        }
    }
}
