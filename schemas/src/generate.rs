//! The JSON Schema files generated from the contract types.
//!
//! [`json_schemas`] is the one list of them. The `generate-schemas` binary writes them under
//! `schemas/json/` ([`REGENERATE_COMMAND`]), and `schemas/tests/drift.rs` fails when the
//! committed files differ from what the types generate.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use schemars::schema_for;
use serde_json::{Map, Value, json};

use crate::{
    EventEnvelope, SCHEMA_VERSION, SagaStartedReply, StartRejected, StartSaga, StepCommand,
    StepCommands, StepReplies, StepReply, amqp, definition,
};

/// The command that rewrites the committed schema files from the types.
pub const REGENERATE_COMMAND: &str = "cargo run -p saga-schemas --bin generate-schemas";

/// Every file name ends with this.
pub const FILE_SUFFIX: &str = ".schema.json";

/// Every generated schema as `(file name, schema)`, in a fixed order.
///
/// Each schema is a JSON Schema (draft 2020-12) with `$id` `urn:saga-schemas:v<N>:<name>`,
/// `x-schema-version` = [`SCHEMA_VERSION`] and, for a message, `x-amqp-type` = the AMQP `type`
/// property the message travels with.
pub fn json_schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "start-saga.schema.json",
            annotate(
                schema_for!(StartSaga),
                "start-saga",
                Some(amqp::message_type::START_SAGA),
            ),
        ),
        (
            "saga-started.schema.json",
            annotate(
                schema_for!(SagaStartedReply),
                "saga-started",
                Some(amqp::message_type::SAGA_STARTED),
            ),
        ),
        (
            "start-rejected.schema.json",
            annotate(
                schema_for!(StartRejected),
                "start-rejected",
                Some(amqp::message_type::START_REJECTED),
            ),
        ),
        (
            "step-command.schema.json",
            annotate(
                schema_for!(StepCommand),
                "step-command",
                Some(amqp::message_type::STEP_COMMAND),
            ),
        ),
        (
            "step-reply.schema.json",
            annotate(
                schema_for!(StepReply),
                "step-reply",
                Some(amqp::message_type::STEP_REPLY),
            ),
        ),
        (
            "step-commands.schema.json",
            annotate(
                schema_for!(StepCommands),
                "step-commands",
                Some(amqp::message_type::STEP_COMMANDS),
            ),
        ),
        (
            "step-replies.schema.json",
            annotate(
                schema_for!(StepReplies),
                "step-replies",
                Some(amqp::message_type::STEP_REPLIES),
            ),
        ),
        (
            "event-envelope.schema.json",
            annotate(
                schema_for!(EventEnvelope),
                "event-envelope",
                Some(amqp::message_type::EVENT),
            ),
        ),
        (
            "saga-definition.schema.json",
            annotate(
                schema_for!(definition::DefinitionFile),
                "saga-definition",
                None,
            ),
        ),
    ]
}

/// The `$id` of the schema named `name` (its file name without [`FILE_SUFFIX`]).
pub fn schema_id(name: &str) -> String {
    format!("urn:saga-schemas:v{SCHEMA_VERSION}:{name}")
}

fn annotate(schema: schemars::Schema, name: &str, amqp_type: Option<&str>) -> Value {
    let mut value = schema.to_value();
    let object = value
        .as_object_mut()
        .expect("schemars generates an object schema for every contract type");
    object.insert("$id".into(), json!(schema_id(name)));
    object.insert("x-schema-version".into(), json!(SCHEMA_VERSION));
    if let Some(amqp_type) = amqp_type {
        object.insert("x-amqp-type".into(), json!(amqp_type));
    }
    value
}

/// The file contents for `schema`: pretty-printed, object keys sorted (so the output does not
/// depend on serde_json's `preserve_order` feature), with a trailing newline.
pub fn render(schema: &Value) -> String {
    let mut text = serde_json::to_string_pretty(&sorted(schema.clone()))
        .expect("a serde_json::Value always serialises");
    text.push('\n');
    text
}

fn sorted(value: Value) -> Value {
    match value {
        Value::Object(object) => {
            let mut entries: Vec<(String, Value)> = object.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sorted(v)))
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// One way the files in a directory differ from what the types generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A schema file is not there.
    Missing(PathBuf),
    /// A schema file's contents differ from the generated ones.
    Differs(PathBuf),
    /// A `*.schema.json` file that no type generates.
    Unexpected(PathBuf),
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Missing(p) => write!(f, "missing: {}", p.display()),
            Drift::Differs(p) => write!(f, "differs from the types: {}", p.display()),
            Drift::Unexpected(p) => write!(f, "not generated by any type: {}", p.display()),
        }
    }
}

/// Compares the `*.schema.json` files in `dir` with what the types generate.
pub fn check(dir: &Path) -> io::Result<Vec<Drift>> {
    let mut drift = Vec::new();
    let expected = json_schemas();
    for (name, schema) in &expected {
        let path = dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) if text == render(schema) => {}
            Ok(_) => drift.push(Drift::Differs(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => drift.push(Drift::Missing(path)),
            Err(e) => return Err(e),
        }
    }
    for path in schema_files_in(dir)? {
        let known = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| expected.iter().any(|(name, _)| *name == n));
        if !known {
            drift.push(Drift::Unexpected(path));
        }
    }
    Ok(drift)
}

/// Writes every schema file into `dir` (creating it) and removes `*.schema.json` files that no
/// type generates. Returns the paths whose contents changed or were removed.
pub fn write_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut changed = Vec::new();
    let expected = json_schemas();
    for (name, schema) in &expected {
        let path = dir.join(name);
        let text = render(schema);
        if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            fs::write(&path, text)?;
            changed.push(path);
        }
    }
    for path in schema_files_in(dir)? {
        let known = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| expected.iter().any(|(name, _)| *name == n));
        if !known {
            fs::remove_file(&path)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

fn schema_files_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let is_schema = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(FILE_SUFFIX));
        if is_schema && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_unique_and_well_formed() {
        let schemas = json_schemas();
        let mut names: Vec<&str> = schemas.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), schemas.len());
        for (name, schema) in &schemas {
            assert!(name.ends_with(FILE_SUFFIX), "{name}");
            let stem = name.strip_suffix(FILE_SUFFIX).unwrap();
            assert_eq!(schema["$id"], json!(schema_id(stem)));
            assert_eq!(schema["x-schema-version"], json!(SCHEMA_VERSION));
            assert!(schema["title"].is_string(), "{name} has no title");
        }
    }

    #[test]
    fn render_sorts_keys_and_ends_with_a_newline() {
        let text = render(&json!({"b": 1, "a": {"d": 2, "c": [ {"f": 3, "e": 4} ]}}));
        assert_eq!(
            text,
            "{\n  \"a\": {\n    \"c\": [\n      {\n        \"e\": 4,\n        \"f\": 3\n      }\n    ],\n    \"d\": 2\n  },\n  \"b\": 1\n}\n"
        );
    }
}
