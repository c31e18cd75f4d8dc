//! The saga definition file (YAML), as written by users.
//!
//! These types are the file's shape and nothing more: they give the JSON Schema editors use
//! (`saga-definition.schema.json`) and what the orchestrator deserialises each part of the file
//! into. The rules that span several values (step order, unique names, durations that parse,
//! `backoff <= max_backoff`, ...) are checked by `saga_engine::definition`, which turns these into
//! validated definitions with defaults applied and reports every error with its line and column.

use std::sync::OnceLock;

use schemars::{JsonSchema, schema_for};
use serde::{Deserialize, Serialize};

/// The characters a participant name may contain: it becomes part of an AMQP queue name.
pub const PARTICIPANT_PATTERN: &str = "^[A-Za-z0-9._-]+$";

/// Whether `name` matches [`PARTICIPANT_PATTERN`]: the one rule, for the definition file, the
/// participant SDK and the topology.
pub fn is_participant_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A duration such as `250ms`, `5s`, `10m`, `1h` or `1m 30s` (humantime syntax).
const DURATION_PATTERN: &str = r"^\s*[0-9]+\s*[a-zµ]+(\s*[0-9]+\s*[a-zµ]+)*\s*$";

/// The saga definition file: every saga the orchestrator can run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Saga definitions")]
pub struct DefinitionFile {
    /// The sagas this file defines. Saga names are unique across every file the orchestrator
    /// loads.
    pub sagas: Vec<SagaSpec>,
}

/// One saga: an ordered list of steps, each a local transaction in one participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SagaSpec {
    /// The saga's name: what a start request names, and part of every message about it.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Free text for people; the orchestrator ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Maximum time from start to the point of no return (e.g. `2m`); past it the saga is
    /// compensated. No deadline when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub deadline: Option<String>,
    /// A JSON Schema (written as YAML) the saga's start input must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
    /// The steps, in order: compensatable steps, then at most one pivot, then retriable steps.
    /// An item may be a `parallel` group of steps that run at once.
    #[schemars(length(min = 1))]
    pub steps: Vec<StepEntrySpec>,
}

/// An item of a saga's `steps`: one step, or a group of steps that run at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StepEntrySpec {
    Step(Box<StepSpec>),
    Parallel(ParallelSpec),
}

/// A group of steps sent at once, each to its own participant. The group succeeds when every
/// step succeeds; when one fails, the others' definitive answers are awaited, then every
/// completed step is compensated (the group's in reverse order of completion). All its steps
/// are compensatable, or it holds only the pivot; each declares its `outputs`, and no two of
/// them declare the same key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    /// The steps of the group (no nested groups).
    #[schemars(length(min = 1))]
    pub parallel: Vec<StepSpec>,
}

/// One step of a saga: a command sent to one participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// The step's stable id, unique within its saga.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Free text for people; the orchestrator ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The participant service that runs the step; its commands go to this participant's queue,
    /// so the name may only contain letters, digits, `.`, `_` and `-`.
    #[schemars(pattern(PARTICIPANT_PATTERN))]
    pub participant: String,
    /// The action the participant runs.
    #[schemars(length(min = 1))]
    pub action: String,
    /// The action that undoes `action`: required on a compensatable step, forbidden on a pivot or
    /// retriable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub compensation: Option<String>,
    /// `compensatable` (the default), `pivot` or `retriable`.
    #[serde(default)]
    pub kind: StepKindSpec,
    /// The keys of the saga data this step's output may write. Required on the steps of a
    /// `parallel` group, where no two steps may declare the same key (their replies arrive in
    /// any order); a key a parallel step writes without declaring it fails the saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
    /// How long one attempt waits for its reply before the step is asked again (e.g. `5s`).
    /// Default `30s`. Each further silence doubles the wait, up to `1m` (or `timeout` if
    /// longer). Silence never fails a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// How long after the step's first attempt the participant may still start the action
    /// (e.g. `1m`); a later command is refused with the failure `expired`, and the saga is
    /// compensated. Never later than the saga's `deadline`. Default `5m`. Not on retriable
    /// steps, which must always run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub expiry: Option<String>,
    /// Retries of the action after a `retryable_error` reply. Default: 3 attempts. Retriable
    /// steps retry without bound and take only `backoff` and `max_backoff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Retries of the compensation after a `retryable_error` reply, before the saga waits for
    /// an operator. Default: 5 attempts, backoff `500ms` up to `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_retry: Option<RetrySpec>,
}

/// What a step can do when it fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKindSpec {
    /// Can be undone: names its `compensation`.
    #[default]
    Compensatable,
    /// The go/no-go point (at most one per saga): once it succeeds the saga must finish.
    Pivot,
    /// After the pivot: retried until it succeeds, never compensated.
    Retriable,
}

/// A retry policy; every key is optional and defaults to the policy it refines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts answered with a `retryable_error` before the step gives up (at least 1).
    /// Silences (timeouts) do not count: they are asked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub max_attempts: Option<i64>,
    /// Wait before the second attempt (e.g. `200ms`); doubles on each further attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub backoff: Option<String>,
    /// Upper bound of the wait between attempts; not below `backoff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub max_backoff: Option<String>,
}

/// The keys a mapping of the file accepts, and those it requires, read from its JSON Schema so
/// the checks and the schema cannot disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingKeys {
    /// Every key, sorted.
    pub known: Vec<String>,
    /// The keys that must be present, sorted.
    pub required: Vec<String>,
}

impl MappingKeys {
    fn of<T: JsonSchema>() -> Self {
        let schema = schema_for!(T);
        let mut known: Vec<String> = schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let mut required: Vec<String> = schema
            .get("required")
            .and_then(|r| r.as_array())
            .map(|r| {
                r.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        known.sort();
        required.sort();
        MappingKeys { known, required }
    }

    pub fn is_known(&self, key: &str) -> bool {
        self.known.iter().any(|k| k == key)
    }
}

macro_rules! mapping_keys {
    ($($ty:ty),*) => {$(
        impl $ty {
            /// The keys this mapping accepts and requires.
            pub fn keys() -> &'static MappingKeys {
                static KEYS: OnceLock<MappingKeys> = OnceLock::new();
                KEYS.get_or_init(MappingKeys::of::<$ty>)
            }
        }
    )*};
}

mapping_keys!(DefinitionFile, SagaSpec, StepSpec, RetrySpec, ParallelSpec);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_schema() {
        let step = StepSpec::keys();
        assert_eq!(step.required, ["action", "name", "participant"]);
        assert!(step.is_known("compensation_retry"));
        assert!(!step.is_known("compensations"));
        assert_eq!(SagaSpec::keys().required, ["name", "steps"]);
        assert_eq!(DefinitionFile::keys().required, ["sagas"]);
        assert!(RetrySpec::keys().required.is_empty());
        assert_eq!(
            RetrySpec::keys().known,
            ["backoff", "max_attempts", "max_backoff"]
        );
    }
}
