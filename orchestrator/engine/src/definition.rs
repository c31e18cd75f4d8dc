//! Validated saga definitions, parsed from the YAML definition file.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod parse;

pub use parse::{DefinitionError, DefinitionErrors};

/// Default per-attempt timeout of a step when `timeout` is not given.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one attempt's reply: each silence doubles a step's wait up to this (or up
/// to the step's `timeout`, when that is longer).
pub const MAX_REASK_WAIT: Duration = Duration::from_secs(60);
/// Default time after a step's first attempt during which its action may start.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// Default retry policy of a step's action: up to 3 attempts answered with a retryable error,
/// so one transient fault never fails a step.
pub const DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    backoff: Duration::from_millis(200),
    max_backoff: Duration::from_secs(5),
};
/// Default budget of a step's compensation before the saga needs an operator.
pub const DEFAULT_COMPENSATION_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 5,
    backoff: Duration::from_millis(500),
    max_backoff: Duration::from_secs(30),
};

/// Every saga of one or more definition files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definitions {
    pub sagas: Vec<SagaDefinition>,
}

impl Definitions {
    pub fn get(&self, name: &str) -> Option<&SagaDefinition> {
        self.sagas.iter().find(|s| s.name == name)
    }

    /// Every participant any saga sends commands to, sorted and without repeats.
    pub fn participants(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self
            .sagas
            .iter()
            .flat_map(|s| s.steps.iter().map(|st| st.participant.as_str()))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaDefinition {
    pub name: String,
    /// Content hash of this saga's definition, recorded with every saga started from it.
    pub version: String,
    /// Maximum time from start to the point of no return; past it the saga is compensated.
    pub deadline: Option<Duration>,
    /// Optional JSON Schema the start input must match.
    pub input_schema: Option<Value>,
    pub steps: Vec<StepDefinition>,
}

impl SagaDefinition {
    /// The content hash [`SagaDefinition::version`] holds: the first 16 hex digits of the SHA-256
    /// of this definition as canonical JSON (sorted keys, no spaces), the `version` field left
    /// out. Any change to a step, a duration, a policy or the input schema changes it.
    pub fn content_version(&self) -> String {
        use sha2::{Digest, Sha256};

        let mut json = serde_json::to_value(self).expect("a saga definition serialises to JSON");
        if let Value::Object(map) = &mut json {
            map.remove("version");
        }
        let mut canonical = String::new();
        write_canonical(&json, &mut canonical);
        let digest = Sha256::digest(canonical.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn step(&self, name: &str) -> Option<(usize, &StepDefinition)> {
        self.steps.iter().enumerate().find(|(_, s)| s.name == name)
    }

    /// The indexes of the steps that run together with step `index`: its `parallel` group, or
    /// the step alone. A saga runs stage after stage.
    pub fn stage(&self, index: usize) -> std::ops::Range<usize> {
        let Some(group) = self.steps[index].group else {
            return index..index + 1;
        };
        let same = |i: &usize| self.steps[*i].group == Some(group);
        let start = (0..index).rev().take_while(same).last().unwrap_or(index);
        let end = (index..self.steps.len())
            .take_while(same)
            .last()
            .unwrap_or(index);
        start..end + 1
    }

    /// Every stage in order: each a range of step indexes.
    pub fn stages(&self) -> Vec<std::ops::Range<usize>> {
        let mut stages = Vec::new();
        let mut i = 0;
        while i < self.steps.len() {
            let stage = self.stage(i);
            i = stage.end;
            stages.push(stage);
        }
        stages
    }

    /// Whether step `index` runs in a group with other steps.
    pub fn is_parallel(&self, index: usize) -> bool {
        self.stage(index).len() > 1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Can be undone by its compensation.
    Compensatable,
    /// The go/no-go point: once it succeeds the saga must finish.
    Pivot,
    /// After the pivot; retried until it succeeds, never compensated.
    Retriable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDefinition {
    pub name: String,
    pub participant: String,
    pub action: String,
    /// Present exactly when `kind` is [`StepKind::Compensatable`].
    pub compensation: Option<String>,
    pub kind: StepKind,
    /// How long the first attempt waits for its reply before the step is asked again.
    pub timeout: Duration,
    /// How long after the first attempt the participant may still start the action; `None` on
    /// retriable steps, which must always run.
    pub expiry: Option<Duration>,
    /// Retries of the action after a retryable error. Retriable steps retry without bound.
    pub retry: RetryPolicy,
    /// Retries of the compensation after a retryable error, before the saga waits for an
    /// operator.
    pub compensation_retry: RetryPolicy,
    /// The `parallel` group the step belongs to: the position of the group in the saga's
    /// `steps` list. The steps of one group are consecutive and run at once. Left out of the
    /// serialised form when absent, so definitions without groups keep their content version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    /// The data keys the step's output may write, when declared (always, in a group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
}

impl StepDefinition {
    /// How long attempt number `silences + 1` in a row without a reply waits: `timeout`
    /// doubled on each silence, capped at [`MAX_REASK_WAIT`] (or `timeout` if longer).
    pub fn wait_after(&self, silences: u32) -> Duration {
        let cap = self.timeout.max(MAX_REASK_WAIT);
        self.timeout
            .checked_mul(1u32 << silences.min(16))
            .unwrap_or(cap)
            .min(cap)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The wait before attempt `next_attempt` (2, 3, ...): `backoff * 2^(next_attempt - 2)`,
    /// capped at `max_backoff`.
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let exponent = next_attempt.saturating_sub(2).min(31);
        self.backoff
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// JSON with object keys sorted at every level, whatever order the map type keeps.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
