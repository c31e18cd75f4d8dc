//! `check`: the exhaustive exploration of a definition's outcomes, and the invariants it
//! checks on every path.

mod common;

use std::time::Duration;

use common::{checkout, saga, step};
use saga_engine::StepKind;
use saga_engine::check::{Bounds, explore, invariants};
use saga_engine::{SagaState, decide};
use saga_schemas::{Data, Direction, SagaEvent, SagaStatus};
use uuid::Uuid;

fn bounds(faults: u32) -> Bounds {
    Bounds {
        faults,
        ..Bounds::default()
    }
}

#[test]
fn without_faults_the_one_path_completes() {
    // Given the checkout saga, when no fault may happen,
    let report = explore(&checkout(), bounds(0));
    // then there is one path, and it completes with every step answered once.
    assert_eq!(report.paths, 1);
    assert_eq!(report.outcomes.len(), 1);
    let ending = &report.outcomes[0];
    assert_eq!(ending.status, SagaStatus::Completed);
    assert_eq!(ending.witness.len(), 1 + checkout().steps.len());
    assert!(report.violations.is_empty());
}

#[test]
fn faults_reach_every_kind_of_ending_and_the_invariants_hold() {
    let mut def = checkout();
    def.deadline = Some(Duration::from_secs(60));
    let report = explore(&def, bounds(2));
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.truncated, 0);
    let statuses: Vec<SagaStatus> = report.outcomes.iter().map(|o| o.status).collect();
    for status in [
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::CompensationFailed,
        SagaStatus::CompletionFailed,
    ] {
        assert!(statuses.contains(&status), "{status:?} never reached");
    }
    // An operator is needed exactly for the two statuses that wait for one.
    for ending in &report.outcomes {
        assert_eq!(
            ending.needs_operator,
            matches!(
                ending.status,
                SagaStatus::CompensationFailed | SagaStatus::CompletionFailed
            )
        );
    }
    // The witness of a declined payment is the shortest way there.
    let declined = report
        .outcomes
        .iter()
        .find(|o| {
            o.cause.as_deref() == Some("step `pay` failed: declined by the participant")
                && o.status == SagaStatus::Compensated
        })
        .expect("a declined payment is compensated");
    assert_eq!(
        declined.witness,
        [
            "the saga starts",
            "`order` action #1 answers success",
            "`stock` action #1 answers success",
            "`pay` action #1 answers failure (declined by the participant)",
            "`stock` compensation #1 answers success",
            "`order` compensation #1 answers success",
        ]
    );
    // Every path ends in exactly one of the outcomes.
    assert_eq!(
        report.outcomes.iter().map(|o| o.paths).sum::<u64>(),
        report.paths
    );
    let diagram = report.mermaid();
    assert!(diagram.starts_with("stateDiagram-v2\n    [*] --> running\n"));
    assert!(diagram.contains("    compensating --> compensated\n"));
}

#[test]
fn more_faults_explore_more_paths_and_the_same_bounds_the_same_ones() {
    let def = checkout();
    let one = explore(&def, bounds(1));
    let two = explore(&def, bounds(2));
    assert!(two.paths > one.paths);
    let again = explore(&def, bounds(2));
    assert_eq!(again.paths, two.paths);
    assert_eq!(again.decisions, two.decisions);
    let without_abort = explore(
        &def,
        Bounds {
            operator_abort: false,
            ..bounds(2)
        },
    );
    assert!(without_abort.paths < two.paths);
    assert!(
        without_abort.outcomes.iter().all(|o| !o
            .cause
            .as_deref()
            .unwrap_or("")
            .starts_with("aborted"))
    );
}

#[test]
fn a_late_success_after_the_saga_was_compensated_is_undone_again_and_reported() {
    let def = saga(vec![
        step("order", StepKind::Compensatable),
        step("stock", StepKind::Compensatable),
    ]);
    let report = explore(&def, bounds(2));
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(report.outcomes.iter().any(|o| {
        o.status == SagaStatus::Compensated
            && o.cause.as_deref() == Some("step `order` completed after the saga was compensated")
    }));
}

/// The invariants themselves: each rule rejects a log that breaks it.
mod invariants {
    use super::*;

    const SAGA: Uuid = Uuid::from_u128(9);

    fn started() -> Vec<SagaEvent> {
        let start = decide(
            &checkout(),
            None,
            &saga_engine::Input::Start {
                saga_id: SAGA,
                input: Data::new(),
                business_key: None,
            },
            common::t0(),
        );
        start.events
    }

    fn sent(step: &str, direction: Direction, attempt: u32) -> SagaEvent {
        SagaEvent::CommandSent {
            step: step.into(),
            direction,
            attempt,
            message_id: Uuid::new_v4(),
            timeout_at: common::t0(),
            sent_at: None,
            expires_at: None,
        }
    }

    fn check(log: &[SagaEvent]) -> Result<(), String> {
        let state = SagaState::fold(SAGA, log).expect("a log that folds");
        invariants(&checkout(), SAGA, log, &state)
    }

    #[test]
    fn a_well_formed_start_passes() {
        assert_eq!(check(&started()), Ok(()));
    }

    #[test]
    fn a_command_sent_twice_is_caught() {
        let mut log = started();
        log.push(sent("order", Direction::Execute, 1));
        let error = check(&log).unwrap_err();
        assert!(error.contains("command sent twice"), "{error}");
    }

    #[test]
    fn a_pivot_compensated_is_caught() {
        let mut log = started();
        log.push(sent("pay", Direction::Compensate, 1));
        let error = check(&log).unwrap_err();
        assert!(error.contains("`pay` is not compensatable"), "{error}");
    }

    #[test]
    fn an_action_after_compensation_began_is_caught() {
        let mut log = started();
        log.push(SagaEvent::CompensationStarted {
            reason: "test".into(),
        });
        log.push(sent("stock", Direction::Execute, 1));
        let error = check(&log).unwrap_err();
        assert!(error.contains("after compensation began"), "{error}");
    }
}

/// order, then [a, b] at once, then pay (pivot) and ship (retriable).
fn grouped() -> saga_engine::SagaDefinition {
    let parallel = |name: &str| saga_engine::StepDefinition {
        group: Some(1),
        outputs: Some(vec![format!("{name}_id")]),
        ..step(name, StepKind::Compensatable)
    };
    saga(vec![
        step("order", StepKind::Compensatable),
        parallel("a"),
        parallel("b"),
        step("pay", StepKind::Pivot),
        step("ship", StepKind::Retriable),
    ])
}

#[test]
fn a_group_explores_the_interleavings_of_its_replies_and_the_invariants_hold() {
    let def = grouped();
    let calm = explore(&def, bounds(0));
    // Without faults, the siblings answer in either order: two paths, both completed.
    assert_eq!(calm.paths, 2);
    assert!(
        calm.outcomes
            .iter()
            .all(|o| o.status == SagaStatus::Completed)
    );

    let mut def = grouped();
    def.deadline = Some(Duration::from_secs(60));
    let report = explore(&def, bounds(2));
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.truncated, 0);
    // A sibling's failure waits for the other's answer: the shortest way to this ending is
    // both failing, with the group's compensation left empty.
    let failed = report
        .outcomes
        .iter()
        .find(|o| {
            o.cause.as_deref() == Some("step `a` failed: declined by the participant")
                && o.status == SagaStatus::Compensated
        })
        .expect("a failed sibling is compensated");
    assert_eq!(
        failed.witness,
        [
            "the saga starts",
            "`order` action #1 answers success",
            "`a` action #1 answers failure (declined by the participant)",
            "`b` action #1 answers failure (declined by the participant)",
            "`order` compensation #1 answers success",
        ]
    );
}
