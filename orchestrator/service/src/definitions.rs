//! Loading saga definition files from disk.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use saga_engine::Definitions;

/// A definition file read from disk: its name as given on the command line, and its text.
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// Reads every file; returns those that could be read and an error for each that could not.
pub fn read_all(paths: &[PathBuf]) -> (Vec<SourceFile>, Vec<anyhow::Error>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match read(path) {
            Ok(file) => files.push(file),
            Err(error) => errors.push(error),
        }
    }
    (files, errors)
}

fn read(path: &Path) -> anyhow::Result<SourceFile> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{name}: cannot read: {e}"))?;
    Ok(SourceFile { name, text })
}

/// Parses files as one set.
pub fn parse(
    files: &[SourceFile],
) -> Result<Definitions, saga_engine::definition::DefinitionErrors> {
    let pairs: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.name.clone(), f.text.clone()))
        .collect();
    Definitions::parse_files(&pairs)
}

/// Reads and parses the files as one set; any problem is an error listing all of them.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Definitions> {
    let (files, read_errors) = read_all(paths);
    if let Some(error) = read_errors.into_iter().next() {
        return Err(error);
    }
    parse(&files).map_err(|errors| anyhow!("invalid saga definitions:\n{errors}"))
}
