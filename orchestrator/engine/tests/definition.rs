//! Reading the saga definition file: the example, the defaults, and every rejection rule.

use std::time::Duration;

use saga_engine::definition::{
    DEFAULT_COMPENSATION_RETRY, DEFAULT_EXPIRY, DEFAULT_RETRY, DEFAULT_STEP_TIMEOUT,
    DefinitionError, DefinitionErrors, Definitions, RetryPolicy, SagaDefinition, StepDefinition,
    StepKind,
};
use serde_json::json;

const EXAMPLE: &str = include_str!("../../sagas.yaml");

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn parse(yaml: &str) -> Result<Definitions, DefinitionErrors> {
    Definitions::parse("test.yaml", yaml)
}

fn all_errors(yaml: &str) -> DefinitionErrors {
    match parse(yaml) {
        Ok(defs) => panic!("expected errors, but it parsed: {defs:#?}"),
        Err(errors) => errors,
    }
}

/// The one error `yaml` has.
fn only_error(yaml: &str) -> DefinitionError {
    let errors = all_errors(yaml);
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error, got:\n{errors}"
    );
    errors.0.into_iter().next().unwrap()
}

/// Asserts where an error is and that its message names the rule.
#[track_caller]
fn assert_error(
    error: &DefinitionError,
    saga: Option<&str>,
    step: Option<&str>,
    line: usize,
    rule: &str,
) {
    assert_eq!(error.file, "test.yaml", "{error}");
    assert_eq!(error.saga.as_deref(), saga, "{error}");
    assert_eq!(error.step.as_deref(), step, "{error}");
    assert_eq!(error.line, Some(line), "{error}");
    assert!(error.column.is_some(), "{error}");
    assert!(
        error.message.contains(rule),
        "message does not name the rule `{rule}`: {error}"
    );
    let shown = error.to_string();
    assert!(shown.starts_with(&format!("test.yaml:{line}:")), "{shown}");
    if let Some(saga) = saga {
        assert!(shown.contains(&format!("saga `{saga}`")), "{shown}");
    }
    if let Some(step) = step {
        assert!(shown.contains(&format!("step `{step}`")), "{shown}");
    }
}

/// A file with one saga `s` whose steps are `steps` (lines from 4 on, indented by 6).
fn saga_with(steps: &str) -> String {
    format!("sagas:\n  - name: s\n    steps:\n{steps}")
}

const GOOD_STEP: &str =
    "      - name: a\n        participant: p\n        action: do\n        compensation: undo\n";

// --- The example and the defaults -----------------------------------------------------------

#[test]
fn the_example_parses_into_the_expected_values() {
    let defs = Definitions::parse("orchestrator/sagas.yaml", EXAMPLE).unwrap();
    assert_eq!(defs.sagas.len(), 1);
    let saga = defs.get("order-checkout").unwrap();
    assert_eq!(saga.deadline, Some(secs(120)));
    let fast_retry = RetryPolicy {
        max_attempts: 3,
        backoff: ms(200),
        max_backoff: secs(5),
    };
    let slow_retry = RetryPolicy {
        max_attempts: DEFAULT_RETRY.max_attempts,
        backoff: ms(500),
        max_backoff: secs(30),
    };
    let step = |name: &str,
                participant: &str,
                action: &str,
                compensation: Option<&str>,
                kind: StepKind,
                retry: RetryPolicy| StepDefinition {
        name: name.into(),
        participant: participant.into(),
        action: action.into(),
        compensation: compensation.map(Into::into),
        kind,
        timeout: secs(10),
        expiry: (kind != StepKind::Retriable).then_some(secs(60)),
        retry,
        compensation_retry: DEFAULT_COMPENSATION_RETRY,
        group: None,
        outputs: None,
    };
    let expected = vec![
        step(
            "create-order",
            "orders",
            "create_order",
            Some("cancel_order"),
            StepKind::Compensatable,
            fast_retry,
        ),
        step(
            "reserve-stock",
            "inventory",
            "reserve",
            Some("release"),
            StepKind::Compensatable,
            fast_retry,
        ),
        step(
            "charge-payment",
            "payments",
            "charge",
            None,
            StepKind::Pivot,
            DEFAULT_RETRY,
        ),
        step(
            "schedule-shipment",
            "shipping",
            "schedule",
            None,
            StepKind::Retriable,
            slow_retry,
        ),
        step(
            "approve-order",
            "orders",
            "approve_order",
            None,
            StepKind::Retriable,
            slow_retry,
        ),
    ];
    assert_eq!(saga.steps, expected);

    let item = json!({
        "type": "object",
        "required": ["sku", "quantity"],
        "additionalProperties": false,
        "properties": {
            "sku": {"type": "string", "minLength": 1},
            "quantity": {"type": "integer", "minimum": 1},
        },
    });
    assert_eq!(
        saga.input_schema,
        Some(json!({
            "type": "object",
            "required": ["customer", "amount", "items"],
            "additionalProperties": false,
            "properties": {
                "customer": {"type": "string", "minLength": 1},
                "amount": {
                    "description": "Order total in the smallest currency unit (e.g. cents).",
                    "type": "integer",
                    "minimum": 0,
                },
                "items": {"type": "array", "minItems": 1, "items": item},
            },
        }))
    );

    assert_eq!(saga.version.len(), 16, "{}", saga.version);
    assert!(saga.version.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(saga.version, saga.content_version());
    assert_eq!(
        defs.participants(),
        ["inventory", "orders", "payments", "shipping"]
    );
}

#[test]
fn defaults_apply_to_every_key_left_out() {
    let defs = parse(&saga_with(GOOD_STEP)).unwrap();
    let saga = &defs.sagas[0];
    assert_eq!(saga.deadline, None);
    assert_eq!(saga.input_schema, None);
    assert_eq!(
        saga.steps,
        [StepDefinition {
            name: "a".into(),
            participant: "p".into(),
            action: "do".into(),
            compensation: Some("undo".into()),
            kind: StepKind::Compensatable,
            timeout: DEFAULT_STEP_TIMEOUT,
            expiry: Some(DEFAULT_EXPIRY),
            retry: DEFAULT_RETRY,
            compensation_retry: DEFAULT_COMPENSATION_RETRY,
            group: None,
            outputs: None,
        }]
    );
}

#[test]
fn each_retry_key_defaults_on_its_own() {
    let yaml = saga_with(
        "      - name: a
        participant: p
        action: do
        compensation: undo
        timeout: 1m 30s
        retry: { max_attempts: 4 }
        compensation_retry: { max_backoff: 1h }
",
    );
    let step = &parse(&yaml).unwrap().sagas[0].steps[0];
    assert_eq!(step.timeout, secs(90));
    assert_eq!(
        step.retry,
        RetryPolicy {
            max_attempts: 4,
            ..DEFAULT_RETRY
        }
    );
    assert_eq!(
        step.compensation_retry,
        RetryPolicy {
            max_backoff: secs(3600),
            ..DEFAULT_COMPENSATION_RETRY
        }
    );
}

#[test]
fn null_optional_values_mean_absent() {
    let yaml = saga_with(
        "      - name: a
        participant: p
        action: do
        kind: pivot
        compensation: ~
        timeout:
        retry: null
",
    );
    let step = &parse(&yaml).unwrap().sagas[0].steps[0];
    assert_eq!(step.compensation, None);
    assert_eq!(step.timeout, DEFAULT_STEP_TIMEOUT);
    assert_eq!(step.retry, DEFAULT_RETRY);
}

#[test]
fn input_schema_scalars_are_typed_as_yaml_types_them() {
    let yaml = "sagas:
  - name: s
    input_schema:
      type: object
      maximum: 10
      multipleOf: 0.5
      nullable: true
      default: ~
      const: '12'
      enum: [a, 1, false]
    steps:
      - {name: a, participant: p, action: x, kind: pivot}
";
    let defs = parse(yaml).unwrap();
    assert_eq!(
        defs.sagas[0].input_schema,
        Some(json!({
            "type": "object",
            "maximum": 10,
            "multipleOf": 0.5,
            "nullable": true,
            "default": null,
            "const": "12",
            "enum": ["a", 1, false],
        }))
    );
}

#[test]
fn the_version_is_a_hash_of_the_validated_content() {
    let base = parse(&saga_with(GOOD_STEP)).unwrap().sagas.remove(0);
    let again = parse(&saga_with(GOOD_STEP)).unwrap().sagas.remove(0);
    assert_eq!(base.version, again.version);

    // A description and the spelling of a duration are not content.
    let described = saga_with(&format!(
        "{GOOD_STEP}        description: says hello\n        timeout: 30000ms\n"
    ));
    assert_eq!(parse(&described).unwrap().sagas[0].version, base.version);

    let longer = saga_with(&format!("{GOOD_STEP}        timeout: 31s\n"));
    assert_ne!(parse(&longer).unwrap().sagas[0].version, base.version);

    let mut changed: SagaDefinition = base.clone();
    changed.steps[0].action = "other".into();
    assert_ne!(changed.content_version(), base.version);
}

#[test]
fn several_files_parse_as_one_set() {
    let a = ("a.yaml".to_owned(), saga_with(GOOD_STEP));
    let b = (
        "b.yaml".to_owned(),
        format!("sagas:\n  - name: t\n    steps:\n{GOOD_STEP}"),
    );
    let defs = Definitions::parse_files(&[a, b]).unwrap();
    let names: Vec<&str> = defs.sagas.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s", "t"]);
}

// --- One test per rejection rule ------------------------------------------------------------

#[test]
fn rejects_yaml_syntax_errors() {
    let error = only_error("sagas:\n  - name: s\n    steps: [\n");
    assert_error(&error, None, None, 4, "YAML syntax error");

    let error = only_error("sagas:\n  - name: s\n    name: t\n");
    assert_error(&error, None, None, 3, "duplicate key `name`");
}

#[test]
fn rejects_unknown_keys_at_every_level() {
    let yaml = "sagas:
  - name: s
    colour: red
    steps:
      - name: a
        participant: p
        action: do
        compensation: undo
        retries: 3
        retry: { max_attempts: 2, jitter: 1s }
        compensation_retry: { max_tries: 2 }
version: 2
";
    let errors = all_errors(yaml);
    assert_eq!(errors.len(), 5, "{errors}");
    assert_error(
        &errors[0],
        Some("s"),
        None,
        3,
        "unknown key `colour` in a saga",
    );
    assert_error(
        &errors[1],
        Some("s"),
        Some("a"),
        9,
        "unknown key `retries` in a step",
    );
    assert_error(
        &errors[2],
        Some("s"),
        Some("a"),
        10,
        "unknown key `jitter` in `retry`",
    );
    assert_error(
        &errors[3],
        Some("s"),
        Some("a"),
        11,
        "unknown key `max_tries` in `compensation_retry`",
    );
    assert_error(
        &errors[4],
        None,
        None,
        12,
        "unknown key `version` in the file",
    );
    assert!(
        errors[1].message.contains("expected one of `action`"),
        "{}",
        errors[1]
    );
}

#[test]
fn rejects_missing_required_keys() {
    let errors = all_errors("sagaz: []\n");
    assert_eq!(errors.len(), 2, "{errors}");
    assert_error(&errors[0], None, None, 1, "unknown key `sagaz` in the file");
    assert_error(
        &errors[1],
        None,
        None,
        1,
        "missing required key `sagas` in the file",
    );

    let error = only_error(
        "sagas:\n  - steps:\n      - {name: a, participant: p, action: x, kind: pivot}\n",
    );
    assert_error(
        &error,
        None,
        None,
        2,
        "missing required key `name` in a saga",
    );

    let error = only_error("sagas:\n  - name: s\n    deadline: 1m\n");
    assert_error(
        &error,
        Some("s"),
        None,
        2,
        "missing required key `steps` in a saga",
    );

    let errors = all_errors(&saga_with("      - name: a\n        kind: retriable\n"));
    assert_eq!(errors.len(), 2, "{errors}");
    assert_error(
        &errors[0],
        Some("s"),
        Some("a"),
        4,
        "missing required key `action`",
    );
    assert_error(
        &errors[1],
        Some("s"),
        Some("a"),
        4,
        "missing required key `participant`",
    );

    let error = only_error(&saga_with(
        "      - participant: p\n        action: x\n        kind: pivot\n",
    ));
    assert_error(
        &error,
        Some("s"),
        None,
        4,
        "missing required key `name` in a step",
    );
}

#[test]
fn rejects_wrong_types() {
    let error = only_error("sagas: {name: s}\n");
    assert_error(&error, None, None, 1, "`sagas` must be a list");

    let error = only_error("sagas:\n  - name: s\n    steps: 3\n");
    assert_error(&error, Some("s"), None, 3, "`steps` must be a list");

    let error = only_error(&saga_with(&format!("{GOOD_STEP}        timeout: [1, 2]\n")));
    assert_error(&error, Some("s"), Some("a"), 8, "wrong type for `timeout`");

    let error = only_error(&saga_with(
        "      - {name: a, participant: p, action: x, kind: final}\n",
    ));
    assert_error(&error, Some("s"), Some("a"), 4, "wrong type for `kind`");
    assert!(error.message.contains("unknown variant `final`"), "{error}");

    let error = only_error(&saga_with(&format!(
        "{GOOD_STEP}        retry: {{ max_attempts: many }}\n"
    )));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        8,
        "wrong type for `retry.max_attempts`",
    );

    let error = only_error(&saga_with("      - just a string\n"));
    assert_error(&error, Some("s"), None, 4, "a step must be a mapping");

    let error = only_error(
        "sagas:\n  - name: s\n    input_schema: [1]\n    steps:\n      - {name: a, participant: p, action: x, kind: pivot}\n",
    );
    assert_error(
        &error,
        Some("s"),
        None,
        3,
        "`input_schema` must be a JSON Schema",
    );
}

#[test]
fn rejects_duplicate_saga_names() {
    let yaml = "sagas:
  - name: s
    steps:
      - {name: a, participant: p, action: x, kind: pivot}
  - name: s
    steps:
      - {name: a, participant: p, action: x, kind: pivot}
";
    let error = only_error(yaml);
    assert_error(&error, Some("s"), None, 5, "duplicate saga name");
    assert!(error.message.contains("test.yaml:2:"), "{error}");
}

#[test]
fn rejects_duplicate_saga_names_across_files() {
    let file = |name: &str| (name.to_owned(), saga_with(GOOD_STEP));
    let errors = Definitions::parse_files(&[file("one.yaml"), file("two.yaml")]).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors}");
    let error = &errors[0];
    assert_eq!(error.file, "two.yaml");
    assert_eq!(error.saga.as_deref(), Some("s"));
    assert_eq!(error.line, Some(2));
    assert!(
        error.message.contains("duplicate saga name") && error.message.contains("one.yaml:2:"),
        "{error}"
    );
}

#[test]
fn rejects_duplicate_step_names() {
    let error = only_error(&saga_with(&format!("{GOOD_STEP}{GOOD_STEP}")));
    assert_error(&error, Some("s"), Some("a"), 8, "duplicate step name");
    assert!(error.message.contains("line 4"), "{error}");
}

#[test]
fn rejects_a_saga_with_no_steps() {
    let error = only_error("sagas:\n  - name: s\n    steps: []\n");
    assert_error(&error, Some("s"), None, 3, "a saga needs at least one step");

    let error = only_error("sagas:\n  - name: s\n    steps:\n");
    assert_error(&error, Some("s"), None, 3, "a saga needs at least one step");
}

#[test]
fn rejects_a_compensatable_step_without_compensation() {
    let error = only_error(&saga_with(
        "      - name: a\n        participant: p\n        action: do\n",
    ));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        4,
        "a compensatable step needs `compensation`",
    );
    // Where the issue's example points: the step's first key.
    assert_eq!(error.column, Some(9));
    assert!(
        error.to_string().starts_with(
            "test.yaml:4:9: saga `s`, step `a`: a compensatable step needs `compensation`"
        ),
        "{error}"
    );
}

#[test]
fn rejects_compensation_on_pivot_and_retriable_steps() {
    for (kind, line) in [("pivot", 7), ("retriable", 7)] {
        let error = only_error(&saga_with(&format!(
            "      - name: a\n        participant: p\n        action: do\n        compensation: undo\n        kind: {kind}\n"
        )));
        assert_error(
            &error,
            Some("s"),
            Some("a"),
            line,
            &format!("a {kind} step must not have `compensation`"),
        );
    }
    let error = only_error(&saga_with(
        "      - name: a\n        participant: p\n        action: do\n        kind: pivot\n        compensation_retry: { max_attempts: 2 }\n",
    ));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        8,
        "a pivot step must not have `compensation_retry`",
    );
}

#[test]
fn rejects_more_than_one_pivot() {
    let error = only_error(&saga_with(
        "      - {name: a, participant: p, action: x, kind: pivot}
      - {name: b, participant: p, action: x, kind: pivot}
",
    ));
    assert_error(&error, Some("s"), Some("b"), 5, "more than one pivot");
    assert!(error.message.contains("`a`"), "{error}");
}

#[test]
fn rejects_steps_out_of_order() {
    let error = only_error(&saga_with(
        "      - {name: p, participant: p, action: x, kind: pivot}
      - {name: c, participant: p, action: x, compensation: y}
",
    ));
    assert_error(&error, Some("s"), Some("c"), 5, "steps out of order");
    assert!(
        error.message.contains("after the pivot step `p`"),
        "{error}"
    );

    let error = only_error(&saga_with(
        "      - {name: r, participant: p, action: x, kind: retriable}
      - {name: p, participant: p, action: x, kind: pivot}
",
    ));
    assert_error(&error, Some("s"), Some("p"), 5, "steps out of order");
    assert!(
        error.message.contains("after the retriable step `r`"),
        "{error}"
    );

    let error = only_error(&saga_with(
        "      - {name: r, participant: p, action: x, kind: retriable}
      - {name: c, participant: p, action: x, compensation: y}
",
    ));
    assert_error(&error, Some("s"), Some("c"), 5, "steps out of order");
}

#[test]
fn rejects_zero_negative_and_unparsable_durations() {
    for (value, rule) in [
        ("0s", "`timeout` must be greater than zero"),
        ("0", "`timeout` must be greater than zero"),
        ("-5s", "`timeout` must be a positive duration"),
        ("soon", "invalid duration for `timeout`"),
        ("5", "invalid duration for `timeout`"),
    ] {
        let error = only_error(&saga_with(&format!(
            "{GOOD_STEP}        timeout: {value}\n"
        )));
        assert_error(&error, Some("s"), Some("a"), 8, rule);
        assert_eq!(error.column, Some(18), "{error}");
    }

    let error = only_error(&format!(
        "sagas:\n  - name: s\n    deadline: 0ms\n    steps:\n{GOOD_STEP}"
    ));
    assert_error(
        &error,
        Some("s"),
        None,
        3,
        "`deadline` must be greater than zero",
    );

    let error = only_error(&format!(
        "sagas:\n  - name: s\n    deadline: tomorrow\n    steps:\n{GOOD_STEP}"
    ));
    assert_error(
        &error,
        Some("s"),
        None,
        3,
        "invalid duration for `deadline`",
    );

    let error = only_error(&saga_with(&format!(
        "{GOOD_STEP}        retry: {{ backoff: -1s }}\n"
    )));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        8,
        "`retry.backoff` must be a positive duration",
    );

    let error = only_error(&saga_with(&format!(
        "{GOOD_STEP}        compensation_retry: {{ max_backoff: 0s }}\n"
    )));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        8,
        "`compensation_retry.max_backoff` must be greater than zero",
    );

    let error = only_error(&saga_with(&format!(
        "{GOOD_STEP}        retry: {{ max_backoff: 5 parsecs }}\n"
    )));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        8,
        "invalid duration for `retry.max_backoff`",
    );
}

#[test]
fn rejects_max_attempts_below_one() {
    for value in ["0", "-1"] {
        let error = only_error(&saga_with(&format!(
            "{GOOD_STEP}        retry: {{ max_attempts: {value} }}\n"
        )));
        assert_error(
            &error,
            Some("s"),
            Some("a"),
            8,
            &format!("`retry.max_attempts` must be at least 1, got {value}"),
        );
    }
}

#[test]
fn rejects_backoff_greater_than_max_backoff() {
    let error = only_error(&saga_with(&format!(
        "{GOOD_STEP}        retry: {{ backoff: 10s, max_backoff: 2s }}\n"
    )));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        8,
        "`retry.backoff` (10s) is greater than `retry.max_backoff` (2s)",
    );

    // Against the default max_backoff (5s) too.
    let error = only_error(&saga_with(&format!(
        "{GOOD_STEP}        retry: {{ backoff: 6s }}\n"
    )));
    assert_error(&error, Some("s"), Some("a"), 8, "(5s, the default)");
}

#[test]
fn rejects_empty_names() {
    let error = only_error(
        "sagas:\n  - name: ''\n    steps:\n      - {name: a, participant: p, action: x, kind: pivot}\n",
    );
    assert_error(&error, None, None, 2, "a saga's `name` must not be empty");

    for (key, line) in [
        ("name", 4),
        ("participant", 5),
        ("action", 6),
        ("compensation", 7),
    ] {
        let step = GOOD_STEP.replace(
            &format!("{key}: "),
            &format!("{key}: \"\"\n        description: "),
        );
        let error = only_error(&saga_with(&step));
        let step_name = (key != "name").then_some("a");
        assert_error(
            &error,
            Some("s"),
            step_name,
            line,
            &format!("`{key}` must not be empty"),
        );
    }

    // A required key with no value is empty, too.
    let error = only_error(&saga_with(
        "      - name: a\n        participant:\n        action: x\n        kind: pivot\n",
    ));
    assert_error(
        &error,
        Some("s"),
        Some("a"),
        5,
        "`participant` must not be empty",
    );
}

#[test]
fn rejects_participant_names_unfit_for_a_queue() {
    for bad in ["'order service'", "orders/eu", "'ordres:1'", "commandes-é"] {
        let step = GOOD_STEP.replace("participant: p", &format!("participant: {bad}"));
        let error = only_error(&saga_with(&step));
        assert_error(&error, Some("s"), Some("a"), 5, "invalid participant name");
        assert!(error.message.contains("AMQP queue"), "{error}");
    }
    let step = GOOD_STEP.replace("participant: p", "participant: Orders.v2_eu-west");
    assert!(parse(&saga_with(&step)).is_ok());
}

// --- Reporting ------------------------------------------------------------------------------

#[test]
fn reports_every_error_in_a_file_in_line_order() {
    let yaml = "sagas:
  - name: checkout
    deadline: never
    steps:
      - name: create
        participant: orders
        action: create
      - name: charge
        participant: pay ments
        action: charge
        kind: pivot
        timeout: 0s
      - name: ship
        participant: shipping
        action: ship
        kind: retriable
        retry: { max_attempts: 2 }
  - name: refund
    steps: []
  - name: checkout
    steps:
      - name: x
        participant: p
        action: y
        kind: sideways
";
    let errors = all_errors(yaml);
    let found: Vec<(Option<usize>, Option<&str>, Option<&str>)> = errors
        .iter()
        .map(|e| (e.line, e.saga.as_deref(), e.step.as_deref()))
        .collect();
    assert_eq!(
        found,
        [
            (Some(3), Some("checkout"), None),            // deadline
            (Some(5), Some("checkout"), Some("create")),  // no compensation
            (Some(9), Some("checkout"), Some("charge")),  // participant
            (Some(12), Some("checkout"), Some("charge")), // timeout
            (Some(17), Some("checkout"), Some("ship")),   // max_attempts
            (Some(19), Some("refund"), None),             // no steps
            (Some(20), Some("checkout"), None),           // duplicate saga
            (Some(25), Some("checkout"), Some("x")),      // kind
        ],
        "{errors}"
    );

    // Display: one error per line.
    let shown = errors.to_string();
    assert_eq!(shown.lines().count(), 8, "{shown}");
    assert!(
        shown.lines().all(|l| l.starts_with("test.yaml:")),
        "{shown}"
    );
}

#[test]
fn an_error_without_a_position_names_the_file() {
    let error = DefinitionError {
        file: "x.yaml".into(),
        saga: Some("s".into()),
        step: None,
        line: None,
        column: None,
        message: "broken".into(),
    };
    assert_eq!(error.to_string(), "x.yaml: saga `s`: broken");
}

#[test]
fn rejects_a_second_yaml_document_instead_of_ignoring_it() {
    let one = saga_with(GOOD_STEP);
    // A leading `---` and a byte-order mark are fine.
    assert!(parse(&format!("\u{feff}# sagas\n---\n{one}")).is_ok());

    let error = only_error(&format!("{one}---\n{one}"));
    assert_error(&error, None, None, 8, "one YAML document");
}

// --- Outcome rules ----------------------------------------------------------------------------

const RETRIABLE_STEP: &str =
    "      - name: a\n        participant: p\n        action: do\n        kind: retriable\n";

#[test]
fn rejects_a_retry_budget_on_a_retriable_step_since_it_would_be_ignored() {
    let step = format!("{RETRIABLE_STEP}        retry: {{ max_attempts: 2, backoff: 1s }}\n");
    let error = only_error(&saga_with(&step));
    assert_error(&error, Some("s"), Some("a"), 8, "retry.max_attempts");
    assert!(error.message.contains("until it succeeds"), "{error}");
    let step = format!("{RETRIABLE_STEP}        retry: {{ backoff: 1s, max_backoff: 10s }}\n");
    assert!(parse(&saga_with(&step)).is_ok());
}

#[test]
fn rejects_an_expiry_on_a_retriable_step() {
    let step = format!("{RETRIABLE_STEP}        expiry: 1m\n");
    let error = only_error(&saga_with(&step));
    assert_error(&error, Some("s"), Some("a"), 8, "must not have `expiry`");
}

#[test]
fn an_expiry_is_a_positive_duration_with_a_default() {
    let step = format!("{GOOD_STEP}        expiry: 90s\n");
    let defs = parse(&saga_with(&step)).unwrap();
    assert_eq!(defs.sagas[0].steps[0].expiry, Some(secs(90)));
    let step = format!("{GOOD_STEP}        expiry: soon\n");
    let error = only_error(&saga_with(&step));
    assert_error(&error, Some("s"), Some("a"), 8, "expiry");
    let retriable = parse(&saga_with(RETRIABLE_STEP)).unwrap();
    assert_eq!(retriable.sagas[0].steps[0].expiry, None);
    assert_eq!(
        parse(&saga_with(GOOD_STEP)).unwrap().sagas[0].steps[0].expiry,
        Some(DEFAULT_EXPIRY)
    );
}

#[test]
fn the_wait_for_a_reply_doubles_on_each_silence_up_to_a_cap() {
    let defs = parse(&saga_with(&format!("{GOOD_STEP}        timeout: 10s\n"))).unwrap();
    let step = &defs.sagas[0].steps[0];
    let waits: Vec<u64> = (0..5).map(|k| step.wait_after(k).as_secs()).collect();
    assert_eq!(waits, [10, 20, 40, 60, 60]);
    let defs = parse(&saga_with(&format!("{GOOD_STEP}        timeout: 5m\n"))).unwrap();
    assert_eq!(
        defs.sagas[0].steps[0].wait_after(3),
        secs(300),
        "never below timeout"
    );
}

// --- Parallel groups -------------------------------------------------------------------------

/// A compensatable step `name` at indent `pad` (spaces before `- name`) declaring `outputs`.
fn grouped_step(pad: usize, name: &str, outputs: &str) -> String {
    let p = " ".repeat(pad);
    format!(
        "{p}- name: {name}\n{p}  participant: p\n{p}  action: do\n{p}  compensation: undo\n\
         {p}  outputs: {outputs}\n"
    )
}

#[test]
fn a_parallel_group_reads_as_consecutive_steps_of_one_group() {
    let yaml = saga_with(&format!(
        "{GOOD_STEP}      - parallel:\n{}{}      - name: z\n        participant: p\n        \
         action: do\n        kind: pivot\n",
        grouped_step(10, "b", "[kb]"),
        grouped_step(10, "c", "[]"),
    ));
    let defs = parse(&yaml).unwrap();
    let saga = &defs.sagas[0];
    let groups: Vec<Option<u32>> = saga.steps.iter().map(|s| s.group).collect();
    assert_eq!(groups, [None, Some(1), Some(1), None]);
    assert_eq!(saga.steps[1].outputs, Some(vec!["kb".to_owned()]));
    assert_eq!(saga.stages(), [0..1, 1..3, 3..4]);
    assert_eq!(saga.stage(2), 1..3);
    assert!(saga.is_parallel(1) && !saga.is_parallel(3));

    // Serialised and read back: the same definition and the same version.
    let json = serde_json::to_string(saga).unwrap();
    let back: SagaDefinition = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, saga);
    assert_eq!(back.content_version(), saga.version);
}

#[test]
fn a_definition_without_groups_serialises_as_before() {
    // The content version hashes the serialised definition: new keys left out when unused keep
    // the versions already stored in databases.
    let defs = Definitions::parse("sagas.yaml", EXAMPLE).unwrap();
    for saga in &defs.sagas {
        let json = serde_json::to_value(saga).unwrap();
        for step in json["steps"].as_array().unwrap() {
            assert!(step.get("group").is_none(), "{step}");
            assert!(step.get("outputs").is_none(), "{step}");
        }
        assert_eq!(saga.version, saga.content_version());
    }
    // As computed before groups existed.
    assert_eq!(defs.sagas[0].version, "715e8f96b5741cfa");
    let groups = saga_with(&format!(
        "      - parallel:\n{}",
        grouped_step(10, "a", "[ka]")
    ));
    let plain = saga_with(&format!("{GOOD_STEP}        outputs: [ka]\n"));
    assert_ne!(
        parse(&groups).unwrap().sagas[0].version,
        parse(&plain).unwrap().sagas[0].version,
        "a group is content"
    );
}

#[test]
fn rejects_parallel_steps_that_write_the_same_key() {
    let yaml = saga_with(&format!(
        "      - parallel:\n{}{}",
        grouped_step(10, "a", "[id, ka]"),
        grouped_step(10, "b", "[kb, id]"),
    ));
    let error = only_error(&yaml);
    assert_error(
        &error,
        Some("s"),
        Some("b"),
        14,
        "output key `id` is also written by `a` (line 9)",
    );
}

#[test]
fn rejects_a_parallel_step_that_does_not_declare_its_outputs() {
    let yaml = saga_with(&format!(
        "      - parallel:\n{}          - name: b\n            participant: p\n            \
         action: do\n            compensation: undo\n",
        grouped_step(10, "a", "[ka]"),
    ));
    let error = only_error(&yaml);
    assert_error(&error, Some("s"), Some("b"), 10, "missing `outputs`");
}

#[test]
fn rejects_a_pivot_in_a_group_of_several_steps_but_not_alone() {
    let pivot = "          - name: p\n            participant: p\n            action: do\n            \
                 kind: pivot\n            outputs: []\n";
    let yaml = saga_with(&format!(
        "      - parallel:\n{}{pivot}",
        grouped_step(10, "a", "[ka]")
    ));
    let error = only_error(&yaml);
    assert_error(
        &error,
        Some("s"),
        Some("p"),
        13,
        "pivot in a group of 2 steps",
    );

    let alone = saga_with(&format!("{GOOD_STEP}      - parallel:\n{pivot}"));
    assert!(parse(&alone).is_ok());
}

#[test]
fn rejects_mixed_kinds_and_groups_of_retriable_steps() {
    let retriable = |name: &str| {
        format!(
            "          - name: {name}\n            participant: p\n            action: do\n            \
             kind: retriable\n            outputs: []\n"
        )
    };
    let mixed = saga_with(&format!(
        "      - parallel:\n{}{}",
        grouped_step(10, "a", "[ka]"),
        retriable("r")
    ));
    let error = only_error(&mixed);
    assert_error(&error, Some("s"), Some("r"), 13, "mixed kinds in a group");

    let only = saga_with(&format!(
        "{GOOD_STEP}      - parallel:\n{}{}",
        retriable("r"),
        retriable("q")
    ));
    let errors = all_errors(&only);
    assert_eq!(errors.len(), 2, "{errors}");
    assert_error(
        &errors[0],
        Some("s"),
        Some("r"),
        12,
        "a group of retriable steps is not supported",
    );
}

#[test]
fn rejects_an_empty_group_and_a_nested_group() {
    let empty = saga_with(&format!("{GOOD_STEP}      - parallel: []\n"));
    assert_error(&only_error(&empty), Some("s"), None, 8, "empty group");

    let nested = saga_with(&format!(
        "      - parallel:\n{}          - parallel:\n{}",
        grouped_step(10, "a", "[ka]"),
        grouped_step(14, "b", "[kb]"),
    ));
    assert_error(
        &only_error(&nested),
        Some("s"),
        Some("b"),
        10,
        "nested group",
    );

    let unknown = saga_with(&format!(
        "      - parallel:\n{}        name: g\n",
        grouped_step(10, "a", "[ka]")
    ));
    assert_error(
        &only_error(&unknown),
        Some("s"),
        None,
        10,
        "unknown key `name` in a `parallel` group",
    );
}

#[test]
fn step_names_are_unique_across_groups() {
    let yaml = saga_with(&format!(
        "{}      - parallel:\n{}",
        grouped_step(6, "a", "[]"),
        grouped_step(10, "a", "[ka]")
    ));
    assert_error(
        &only_error(&yaml),
        Some("s"),
        Some("a"),
        10,
        "duplicate step name",
    );
}
