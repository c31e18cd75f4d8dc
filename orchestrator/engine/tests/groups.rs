//! Given/when/then tests of parallel step groups: fork, join, waiting for the siblings of a
//! failed step, and compensation in reverse order of completion.

mod common;

use common::*;
use saga_engine::check::invariants;
use saga_engine::{SagaDefinition, StepDefinition, StepKind};
use saga_schemas::{Direction, SagaStatus};
use serde_json::json;

/// A step of group `group` that declares `outputs`.
fn parallel(name: &str, group: u32, outputs: &[&str]) -> StepDefinition {
    StepDefinition {
        group: Some(group),
        outputs: Some(outputs.iter().map(|k| (*k).to_owned()).collect()),
        ..step(name, StepKind::Compensatable)
    }
}

/// order, then [a, b, c] at once, then pay (pivot).
fn fork() -> SagaDefinition {
    saga(vec![
        step("order", StepKind::Compensatable),
        parallel("a", 1, &["ka"]),
        parallel("b", 1, &["kb"]),
        parallel("c", 1, &["kc"]),
        step("pay", StepKind::Pivot),
    ])
}

fn comps(s: &Scenario) -> Vec<String> {
    s.log
        .iter()
        .filter_map(|e| match e {
            saga_schemas::SagaEvent::CommandSent {
                step,
                direction: Direction::Compensate,
                ..
            } => Some(step.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_group_is_sent_at_once_and_joins_when_every_step_completed() {
    let s = given(fork())
        .started()
        .when(ok("order", 1, json!({"order_id": 1})));
    assert_eq!(s.commands(), [exec("a", 1), exec("b", 1), exec("c", 1)]);
    let s = s.and([ok("c", 1, json!({"kc": 3})), ok("a", 1, json!({"ka": 1}))]);
    assert_eq!(s.events(), ["step_completed"], "b still runs");
    assert!(s.commands().is_empty());
    let s = s.when(ok("b", 1, json!({"kb": 2})));
    assert_eq!(s.events(), ["step_completed", "command_sent"]);
    assert_eq!(s.commands(), [exec("pay", 1)]);
    assert_eq!(
        s.decision().commands[0].data,
        object(json!({"customer": "ada", "order_id": 1, "ka": 1, "kb": 2, "kc": 3}))
    );
}

#[test]
fn a_failure_waits_for_the_siblings_then_undoes_the_group_in_reverse_completion_order() {
    let s = given(fork())
        .started()
        .and([
            ok("order", 1, json!({})),
            ok("c", 1, json!({})),
            ok("a", 1, json!({})),
        ])
        .when(fail("b", 1, "no slot"));
    assert_eq!(
        s.events(),
        ["step_failed", "compensation_started", "command_sent"],
        "no sibling awaits its answer"
    );
    assert_eq!(s.status(), SagaStatus::Compensating);
    // a completed after c: a is undone first, then c, then the earlier step.
    assert_eq!(s.commands(), [comp("a", 1)]);
    let s = s.and([undone("a", 1)]);
    assert_eq!(s.commands(), [comp("c", 1)]);
    let s = s.and([undone("c", 1)]);
    assert_eq!(s.commands(), [comp("order", 1)]);
    let s = s.when(undone("order", 1));
    assert_eq!(s.status(), SagaStatus::Compensated);
    assert_eq!(comps(&s), ["a", "c", "order"]);
}

#[test]
fn silence_of_a_sibling_is_asked_again_and_its_late_success_is_undone_first() {
    let s = given(fork())
        .started()
        .and([ok("order", 1, json!({})), ok("a", 1, json!({}))])
        .when(fail("b", 1, "no slot"));
    assert_eq!(s.events(), ["step_failed"]);
    assert_eq!(s.status(), SagaStatus::Running, "c has not answered");
    assert!(s.commands().is_empty());
    let s = s.when(timed_out("c", Direction::Execute, 1));
    assert_eq!(s.events(), ["attempt_timed_out", "command_sent"]);
    assert_eq!(s.commands(), [exec("c", 2)], "silence re-asks, never fails");
    let s = s.when(ok("c", 1, json!({})));
    assert_eq!(
        s.events(),
        ["step_completed", "compensation_started", "command_sent"]
    );
    assert_eq!(s.commands(), [comp("c", 1)]);
    assert_eq!(
        s.state.as_ref().unwrap().compensation_reason.as_deref(),
        Some("step `b` failed: no slot")
    );
    let s = s.and([undone("c", 1), undone("a", 1), undone("order", 1)]);
    assert_eq!(comps(&s), ["c", "a", "order"]);
    assert_eq!(s.status(), SagaStatus::Compensated);
}

#[test]
fn an_expiry_refusal_of_a_sibling_is_its_definitive_failure() {
    let s = given(fork())
        .started()
        .and([
            ok("order", 1, json!({})),
            fail("a", 1, "no stock"),
            timed_out("b", Direction::Execute, 1),
            ok("c", 1, json!({})),
        ])
        .when(fail("b", 2, saga_schemas::EXPIRED));
    assert_eq!(
        s.events(),
        ["step_failed", "compensation_started", "command_sent"]
    );
    // b may have run (its first attempt went unanswered): it is undone too, first.
    assert_eq!(s.commands(), [comp("b", 1)]);
    let s = s.and([undone("b", 1), undone("c", 1), undone("order", 1)]);
    assert_eq!(comps(&s), ["b", "c", "order"]);
}

#[test]
fn a_retryable_error_of_a_sibling_is_not_retried_once_the_group_failed() {
    let s = given(fork())
        .started()
        .and([
            ok("order", 1, json!({})),
            ok("a", 1, json!({})),
            fail("b", 1, "no slot"),
        ])
        .when(error("c", 1, "busy"));
    assert_eq!(
        s.events(),
        [
            "attempt_failed",
            "step_failed",
            "compensation_started",
            "command_sent"
        ]
    );
    assert_eq!(s.commands(), [comp("a", 1)]);
}

#[test]
fn a_retryable_error_before_any_failure_is_retried_within_the_group() {
    let s = given(fork())
        .started()
        .and([ok("order", 1, json!({}))])
        .when(error("a", 1, "busy"));
    assert_eq!(s.events(), ["attempt_failed", "retry_scheduled"]);
    let s = s.when(retry_due("a", Direction::Execute, 2));
    assert_eq!(s.commands(), [exec("a", 2)]);
}

#[test]
fn an_abort_waits_for_the_group_then_undoes_what_completed() {
    let s = given(fork())
        .started()
        .and([ok("order", 1, json!({})), ok("b", 1, json!({}))])
        .when(abort());
    assert_eq!(s.events(), ["abort_requested"]);
    assert_eq!(s.status(), SagaStatus::Running);
    let s = s.and([ok("c", 1, json!({}))]);
    assert!(s.commands().is_empty());
    let s = s.when(ok("a", 1, json!({})));
    assert_eq!(s.status(), SagaStatus::Compensating);
    assert_eq!(
        s.state.as_ref().unwrap().compensation_reason.as_deref(),
        Some("aborted: customer cancelled")
    );
    let s = s.and([
        undone("a", 1),
        undone("c", 1),
        undone("b", 1),
        undone("order", 1),
    ]);
    assert_eq!(comps(&s), ["a", "c", "b", "order"]);
    assert_eq!(s.status(), SagaStatus::Compensated);
}

#[test]
fn the_deadline_waits_for_the_group() {
    let mut def = fork();
    def.deadline = Some(std::time::Duration::from_secs(30));
    let s = given(def)
        .started()
        .and([ok("order", 1, json!({})), ok("a", 1, json!({}))])
        .when(deadline());
    assert_eq!(s.events(), ["deadline_exceeded"]);
    let s = s.and([ok("b", 1, json!({}))]).when(fail("c", 1, "expired"));
    assert_eq!(s.status(), SagaStatus::Compensating);
    assert_eq!(s.commands(), [comp("b", 1)]);
}

#[test]
fn an_output_key_a_parallel_step_does_not_declare_fails_the_saga() {
    let s = given(fork())
        .started()
        .and([
            ok("order", 1, json!({})),
            ok("a", 1, json!({"ka": 1, "kb": "mine"})),
            ok("b", 1, json!({"kb": 2})),
        ])
        .when(ok("c", 1, json!({})));
    assert_eq!(s.status(), SagaStatus::Compensating);
    let reason = s.state.as_ref().unwrap().compensation_reason.clone();
    assert_eq!(
        reason.as_deref(),
        Some("step `a` wrote the output key `kb`, which it does not declare in `outputs`")
    );
    assert_eq!(s.commands(), [comp("c", 1)]);
}

#[test]
fn a_path_through_a_failed_group_keeps_the_invariants() {
    let s = given(fork()).started().and([
        ok("order", 1, json!({})),
        ok("c", 1, json!({})),
        ok("a", 1, json!({})),
        fail("b", 1, "no slot"),
        undone("a", 1),
        undone("c", 1),
        undone("order", 1),
    ]);
    invariants(&s.def, s.saga_id, &s.log, s.state.as_ref().unwrap()).unwrap();
}

#[test]
fn the_step_that_broke_the_group_first_names_the_compensation() {
    let s = given(fork())
        .started()
        .and([
            ok("order", 1, json!({})),
            ok("a", 1, json!({})),
            fail("c", 1, "no slot"),
        ])
        .when(error("b", 1, "busy"));
    assert_eq!(s.status(), SagaStatus::Compensating);
    assert_eq!(
        s.state.as_ref().unwrap().compensation_reason.as_deref(),
        Some("step `c` failed: no slot"),
        "b failed only because c had: it was not retried"
    );
}
