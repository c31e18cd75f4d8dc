//! Given/when/then tests of every rule of the engine.

mod common;

use std::time::Duration;

use common::*;
use saga_engine::definition::{MAX_REASK_WAIT, RetryPolicy};
use saga_engine::engine::command_message_id;
use saga_engine::{
    Ignored, Input, OperatorCommand, Outcome, Rejection, StepKind, TimerKind, decide,
};
use saga_schemas::{Data, Direction, Outcome as Reply, SagaStatus};
use serde_json::json;
use uuid::Uuid;

// --- forward path -------------------------------------------------------------------------

#[test]
fn start_sends_the_first_action_with_its_timeout() {
    let s = given(checkout()).started();
    assert_eq!(s.events(), ["saga_started", "command_sent"]);
    assert_eq!(s.commands(), [exec("order", 1)]);
    let command = &s.decision().commands[0];
    assert_eq!(command.action, "do_order");
    assert_eq!(command.data, object(json!({"customer": "ada"})));
    assert_eq!(
        s.scheduled(),
        [(
            TimerKind::StepTimeout {
                step: "order".into(),
                direction: Direction::Execute,
                attempt: 1
            },
            t0() + STEP_TIMEOUT
        )]
    );
    assert_eq!(s.status(), SagaStatus::Running);
}

#[test]
fn a_success_merges_its_output_and_sends_the_next_step() {
    let s = given(checkout()).started().when(ok(
        "order",
        1,
        json!({"order_id": 7, "customer": "ada lovelace"}),
    ));
    assert_eq!(s.events(), ["step_completed", "command_sent"]);
    assert_eq!(s.commands(), [exec("stock", 1)]);
    assert_eq!(
        s.decision().commands[0].data,
        object(json!({"customer": "ada lovelace", "order_id": 7})),
        "later keys overwrite earlier ones"
    );
    assert!(s.cancelled().contains(&TimerKind::StepTimeout {
        step: "order".into(),
        direction: Direction::Execute,
        attempt: 1
    }));
}

#[test]
fn every_step_succeeding_completes_the_saga() {
    let s = given(checkout())
        .started()
        .and([
            ok("order", 1, json!({})),
            ok("stock", 1, json!({})),
            ok("pay", 1, json!({})),
        ])
        .when(ok("ship", 1, json!({"tracking": "T1"})));
    assert_eq!(s.events(), ["step_completed", "saga_completed"]);
    assert!(s.commands().is_empty());
    assert_eq!(s.status(), SagaStatus::Completed);
    assert_eq!(s.state.as_ref().unwrap().data["tracking"], "T1");
}

// --- failure and compensation ---------------------------------------------------------------

#[test]
fn a_business_failure_compensates_the_completed_steps_but_not_the_failed_one() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({"order_id": 7}))])
        .when(fail("stock", 1, "out of stock"));
    assert_eq!(
        s.events(),
        ["step_failed", "compensation_started", "command_sent"]
    );
    assert_eq!(s.commands(), [comp("order", 1)]);
    let undo = &s.decision().commands[0];
    assert_eq!(undo.action, "undo_order");
    assert_eq!(undo.action_output, Some(object(json!({"order_id": 7}))));
    assert_eq!(s.status(), SagaStatus::Compensating);
}

#[test]
fn compensations_run_one_at_a_time_in_reverse_order() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))])
        .when(fail("pay", 1, "card declined"));
    assert_eq!(s.commands(), [comp("stock", 1)]);
    let s = s.when(undone("stock", 1));
    assert_eq!(s.commands(), [comp("order", 1)]);
    let s = s.when(undone("order", 1));
    assert_eq!(s.events(), ["step_compensated", "saga_compensated"]);
    assert_eq!(s.status(), SagaStatus::Compensated);
}

#[test]
fn a_failure_of_the_first_step_compensates_nothing() {
    let s = given(checkout())
        .started()
        .when(fail("order", 1, "bad customer"));
    assert_eq!(
        s.events(),
        ["step_failed", "compensation_started", "saga_compensated"]
    );
    assert!(s.commands().is_empty());
}

// --- retries and timeouts -----------------------------------------------------------------

fn retrying(max_attempts: u32) -> saga_engine::SagaDefinition {
    let mut def = checkout();
    def.steps[1].retry = RetryPolicy {
        max_attempts,
        backoff: Duration::from_millis(200),
        max_backoff: Duration::from_millis(500),
    };
    def
}

#[test]
fn a_retryable_error_schedules_a_retry_with_exponential_backoff_capped() {
    let s = given(retrying(4))
        .started()
        .and([ok("order", 1, json!({}))])
        .when(error("stock", 1, "db busy"));
    assert_eq!(s.events(), ["attempt_failed", "retry_scheduled"]);
    assert!(s.commands().is_empty());
    let retry2 = TimerKind::Retry {
        step: "stock".into(),
        direction: Direction::Execute,
        attempt: 2,
    };
    assert_eq!(
        s.scheduled(),
        [(retry2.clone(), t0() + Duration::from_millis(200))]
    );

    let s = s
        .after(Duration::from_millis(200))
        .when(Input::Timer(retry2));
    assert_eq!(s.commands(), [exec("stock", 2)]);
    let s = s.when(error("stock", 2, "db busy"));
    assert_eq!(s.scheduled()[0].1, s.now + Duration::from_millis(400));
    let s = s
        .and([retry_due("stock", Direction::Execute, 3)])
        .when(error("stock", 3, "db busy"));
    assert_eq!(
        s.scheduled()[0].1,
        s.now + Duration::from_millis(500),
        "capped at max_backoff"
    );
}

#[test]
fn retries_exhausted_fail_the_step_and_compensate() {
    let s = given(retrying(2))
        .started()
        .and([
            ok("order", 1, json!({})),
            error("stock", 1, "db busy"),
            retry_due("stock", Direction::Execute, 2),
        ])
        .when(error("stock", 2, "db busy"));
    assert_eq!(
        s.events(),
        [
            "attempt_failed",
            "step_failed",
            "compensation_started",
            "command_sent"
        ]
    );
    assert_eq!(s.commands(), [comp("order", 1)]);
}

#[test]
fn a_timeout_asks_again_with_a_doubled_wait() {
    let s = given(retrying(2))
        .started()
        .and([ok("order", 1, json!({}))])
        .after(STEP_TIMEOUT)
        .when(timed_out("stock", Direction::Execute, 1));
    assert_eq!(s.events(), ["attempt_timed_out", "command_sent"]);
    assert_eq!(s.commands(), [exec("stock", 2)]);
    let now = t0() + STEP_TIMEOUT;
    assert!(s.scheduled().contains(&(
        TimerKind::StepTimeout {
            step: "stock".into(),
            direction: Direction::Execute,
            attempt: 2
        },
        now + STEP_TIMEOUT * 2
    )));
}

#[test]
fn silence_never_fails_a_step_and_the_wait_is_capped() {
    let mut s = given(checkout())
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))]);
    for attempt in 1..=20 {
        s = s.when(timed_out("pay", Direction::Execute, attempt));
        assert_eq!(s.commands(), [exec("pay", attempt + 1)]);
        assert_eq!(s.status(), SagaStatus::Running);
    }
    let wait = s.scheduled()[0].1 - s.now;
    assert_eq!(wait.to_std().unwrap(), MAX_REASK_WAIT);
    // The pivot ran all along: its recorded success arrives for the first attempt.
    let s = s.when(ok("pay", 1, json!({})));
    assert_eq!(s.commands(), [exec("ship", 1)]);
    assert!(s.cancelled().contains(&TimerKind::StepTimeout {
        step: "pay".into(),
        direction: Direction::Execute,
        attempt: 21
    }));
}

#[test]
fn a_retryable_error_at_the_pivot_is_retried_by_default() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))])
        .when(error(
            "pay",
            1,
            "terminating connection due to administrator command",
        ));
    assert_eq!(s.events(), ["attempt_failed", "retry_scheduled"]);
    let s = s
        .and([retry_due("pay", Direction::Execute, 2)])
        .when(ok("pay", 2, json!({})));
    assert_eq!(s.commands(), [exec("ship", 1)]);
}

#[test]
fn timeouts_do_not_spend_the_retry_budget() {
    let s = given(retrying(2)).started().and([
        ok("order", 1, json!({})),
        timed_out("stock", Direction::Execute, 1),
        timed_out("stock", Direction::Execute, 2),
        error("stock", 3, "busy"),
    ]);
    assert_eq!(s.events(), ["attempt_failed", "retry_scheduled"]);
    let s = s
        .and([retry_due("stock", Direction::Execute, 4)])
        .when(error("stock", 4, "busy"));
    assert_eq!(
        s.events(),
        [
            "attempt_failed",
            "step_failed",
            "compensation_started",
            "command_sent"
        ],
        "the second retryable error spends a budget of 2"
    );
    assert_eq!(
        s.commands(),
        [comp("stock", 1)],
        "the silent attempts may have run"
    );
}

#[test]
fn an_expired_refusal_compensates_the_steps_before_it() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))])
        .after(EXPIRY)
        .and([timed_out("pay", Direction::Execute, 1)])
        .when(fail("pay", 2, saga_schemas::EXPIRED));
    assert_eq!(
        s.events(),
        ["step_failed", "compensation_started", "command_sent"]
    );
    assert_eq!(
        s.commands(),
        [comp("stock", 1)],
        "the pivot is not compensated"
    );
    let s = s.and([undone("stock", 1), undone("order", 1)]);
    assert_eq!(s.status(), SagaStatus::Compensated);
}

#[test]
fn every_attempt_of_an_action_carries_the_expiry_of_the_first() {
    let s = given(checkout()).started();
    let first = s.decision().commands[0].expires_at;
    assert_eq!(first, Some(t0() + EXPIRY));
    let s = s
        .after(STEP_TIMEOUT)
        .when(timed_out("order", Direction::Execute, 1));
    assert_eq!(s.decision().commands[0].expires_at, first);
    let s = s.when(ok("order", 2, json!({})));
    assert_eq!(
        s.decision().commands[0].expires_at,
        Some(t0() + STEP_TIMEOUT + EXPIRY),
        "the next step's expiry counts from its own first attempt"
    );
}

#[test]
fn the_expiry_never_outlasts_the_deadline_and_retriable_steps_have_none() {
    let mut def = checkout();
    def.deadline = Some(Duration::from_secs(30));
    let s = given(def).started();
    assert_eq!(
        s.decision().commands[0].expires_at,
        Some(t0() + Duration::from_secs(30))
    );
    let s = given(checkout()).started().and([
        ok("order", 1, json!({})),
        ok("stock", 1, json!({})),
        ok("pay", 1, json!({})),
    ]);
    assert_eq!(s.commands(), [exec("ship", 1)]);
    assert_eq!(s.decision().commands[0].expires_at, None);
    let undo = given(checkout())
        .started()
        .and([ok("order", 1, json!({}))])
        .when(fail("stock", 1, "no stock"));
    assert_eq!(
        undo.decision().commands[0].expires_at,
        None,
        "compensations must run"
    );
}

#[test]
fn a_late_success_for_a_timed_out_attempt_still_counts() {
    let s = given(retrying(3))
        .started()
        .and([
            ok("order", 1, json!({})),
            timed_out("stock", Direction::Execute, 1),
        ])
        .when(ok("stock", 1, json!({"reservation": 1})));
    assert_eq!(s.events(), ["step_completed", "command_sent"]);
    assert_eq!(s.commands(), [exec("pay", 1)]);
    assert!(s.cancelled().contains(&TimerKind::StepTimeout {
        step: "stock".into(),
        direction: Direction::Execute,
        attempt: 2
    }));
    // The re-ask's answer (the same recorded outcome) is a duplicate.
    let s = s.when(ok("stock", 2, json!({"reservation": 1})));
    assert_eq!(
        s.outcome(),
        &Outcome::Ignored(Ignored::AlreadyCompleted {
            step: "stock".into()
        })
    );
}

// --- duplicates and stale inputs ----------------------------------------------------------

#[test]
fn a_duplicate_reply_changes_nothing() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({}))])
        .when(ok("order", 1, json!({})));
    assert!(s.ignored());
    assert!(s.events().is_empty() && s.commands().is_empty());
}

#[test]
fn a_definitive_reply_counts_from_any_attempt() {
    let s = given(retrying(3))
        .started()
        .and([
            ok("order", 1, json!({})),
            error("stock", 1, "busy"),
            retry_due("stock", Direction::Execute, 2),
        ])
        .when(fail("stock", 1, "out of stock"));
    assert_eq!(
        s.events(),
        ["step_failed", "compensation_started", "command_sent"]
    );
    assert!(s.cancelled().contains(&TimerKind::StepTimeout {
        step: "stock".into(),
        direction: Direction::Execute,
        attempt: 2
    }));
}

#[test]
fn a_retryable_error_counts_only_for_the_attempt_awaited() {
    let s = given(retrying(3))
        .started()
        .and([
            ok("order", 1, json!({})),
            timed_out("stock", Direction::Execute, 1),
        ])
        .when(error("stock", 1, "busy"));
    assert_eq!(
        s.outcome(),
        &Outcome::Ignored(Ignored::NotAwaited {
            step: "stock".into(),
            attempt: 1
        })
    );
}

#[test]
fn a_timeout_after_the_reply_is_ignored() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({}))])
        .when(timed_out("order", Direction::Execute, 1));
    assert!(s.ignored());
}

#[test]
fn replies_for_unknown_sagas_steps_or_attempts_are_ignored() {
    let def = checkout();
    let d = decide(&def, None, &ok("order", 1, json!({})), t0());
    assert_eq!(
        d.outcome,
        Outcome::Ignored(saga_engine::Ignored::UnknownSaga)
    );
    assert!(d.state.is_none());
    let s = given(checkout()).started();
    assert!(s.clone().when(ok("nope", 1, json!({}))).ignored());
    assert!(
        s.clone().when(ok("stock", 1, json!({}))).ignored(),
        "never sent"
    );
    assert!(
        s.when(ok("order", 2, json!({}))).ignored(),
        "attempt never sent"
    );
}

#[test]
fn a_reply_to_a_command_never_sent_is_ignored() {
    let s = given(checkout()).started();
    let success = || Reply::Success {
        output: object(json!({"order_id": "forged"})),
    };
    let forged = Uuid::from_u128(7);
    let ignored = s
        .clone()
        .when(answer_to("order", Direction::Execute, 1, forged, success()));
    assert_eq!(
        ignored.outcome(),
        &Outcome::Ignored(Ignored::UnknownCommand {
            step: "order".into(),
            direction: Direction::Execute,
            attempt: 1,
            in_reply_to: forged,
        })
    );
    assert_eq!(ignored.status(), SagaStatus::Running);
    // The id of another command of the saga does not do either: not another step's, not
    // another direction's, not another attempt's.
    for (step, direction, attempt) in [
        ("stock", Direction::Execute, 1),
        ("order", Direction::Compensate, 1),
        ("order", Direction::Execute, 2),
    ] {
        let id = command_message_id(SAGA_ID, step, direction, attempt);
        assert!(
            s.clone()
                .when(answer_to("order", Direction::Execute, 1, id, success()))
                .ignored(),
            "{step} {direction} {attempt}"
        );
    }
    // Nor the command of the same step of another saga.
    let elsewhere = command_message_id(Uuid::from_u128(43), "order", Direction::Execute, 1);
    let s = s.when(answer_to(
        "order",
        Direction::Execute,
        1,
        elsewhere,
        Reply::Failure {
            reason: "forged".into(),
        },
    ));
    assert!(s.ignored());
    // Ids are deterministic, so the id of an attempt not yet sent can be computed: it does
    // not count either.
    assert_eq!(
        s.clone().when(ok("order", 2, json!({}))).outcome(),
        &Outcome::Ignored(Ignored::NoSuchAttempt {
            step: "order".into(),
            direction: Direction::Execute,
            attempt: 2
        })
    );
    // The genuine answer still counts.
    let s = s.when(ok("order", 1, json!({"order_id": 1})));
    assert_eq!(s.commands(), [exec("stock", 1)]);
}

#[test]
fn a_second_start_is_ignored() {
    let s = given(checkout()).started().started();
    assert!(s.ignored());
}

// --- late successes -----------------------------------------------------------------------

#[test]
fn a_success_that_arrives_after_compensation_began_is_compensated() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({}))])
        .when(abort());
    // The in-flight reservation may run: it is undone first.
    assert_eq!(s.commands(), [comp("stock", 1)]);
    let s = s.when(ok("stock", 1, json!({"reservation": 9})));
    assert_eq!(
        s.events(),
        ["step_completed"],
        "its compensation is already on its way"
    );
    let s = s.and([undone("stock", 1)]);
    assert_eq!(s.commands(), [comp("order", 1)]);
}

#[test]
fn a_success_after_the_saga_was_compensated_reopens_compensation() {
    let s = given(checkout()).started().and([
        ok("order", 1, json!({})),
        abort(),
        undone("stock", 1),
        undone("order", 1),
    ]);
    assert_eq!(s.status(), SagaStatus::Compensated);
    let s = s.when(ok("stock", 1, json!({})));
    assert_eq!(
        s.events(),
        ["step_completed", "compensation_started", "command_sent"]
    );
    assert_eq!(s.commands(), [comp("stock", 2)]);
    // A stray duplicate of the earlier compensation's reply does not settle the new one.
    assert!(s.clone().when(undone("stock", 1)).ignored());
    let s = s.when(undone("stock", 2));
    assert_eq!(s.status(), SagaStatus::Compensated);
}

#[test]
fn a_silent_pivot_holds_the_deadline_until_it_answers() {
    let mut def = checkout();
    def.deadline = Some(Duration::from_secs(60));
    let s = given(def)
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))])
        .after(STEP_TIMEOUT)
        .and([timed_out("pay", Direction::Execute, 1)])
        .after(Duration::from_secs(60))
        .when(deadline());
    assert_eq!(s.events(), ["deadline_exceeded"], "the pivot may have run");
    let s = s.when(error("pay", 2, "db down"));
    assert_eq!(
        s.events(),
        ["attempt_failed", "retry_scheduled"],
        "an unanswered attempt is still outstanding: ask until a definitive answer"
    );
    let s = s
        .and([retry_due("pay", Direction::Execute, 3)])
        .when(ok("pay", 1, json!({})));
    assert_eq!(
        s.commands(),
        [exec("ship", 1)],
        "it ran: the saga must finish"
    );
}

#[test]
fn a_pivot_that_succeeds_after_compensation_began_needs_an_operator() {
    // Only a participant that breaks the contract (answers success after it refused) gets here.
    let s = given(checkout()).started().and([
        ok("order", 1, json!({})),
        ok("stock", 1, json!({})),
        fail("pay", 1, "declined"),
    ]);
    assert_eq!(
        s.commands(),
        [comp("stock", 1)],
        "the pivot is not compensated"
    );
    let s = s.and([undone("stock", 1), undone("order", 1)]);
    assert_eq!(s.status(), SagaStatus::Compensated);
    let s = s.when(ok("pay", 1, json!({})));
    assert_eq!(
        s.events(),
        [
            "step_completed",
            "compensation_started",
            "compensation_failed"
        ]
    );
    assert_eq!(s.status(), SagaStatus::CompensationFailed);
    let retry = s.clone().when(operator(OperatorCommand::RetryCompensation));
    assert_eq!(
        retry.outcome(),
        &Outcome::Rejected(Rejection::NoCompensation { step: "pay".into() })
    );
    let s = s.when(operator(OperatorCommand::MarkCompensated {
        step: "pay".into(),
    }));
    assert_eq!(s.events(), ["step_compensated", "saga_compensated"]);
}

// --- compensation failures and operators ---------------------------------------------------

fn compensating_order() -> Scenario {
    given(checkout())
        .started()
        .and([ok("order", 1, json!({}))])
        .when(fail("stock", 1, "no stock"))
}

#[test]
fn a_compensation_is_retried_on_its_own_budget_then_waits_for_an_operator() {
    let s = compensating_order().when(undo_error("order", 1));
    assert_eq!(s.events(), ["attempt_failed", "retry_scheduled"]);
    let s = s.when(retry_due("order", Direction::Compensate, 2));
    assert_eq!(s.commands(), [comp("order", 2)]);
    let s = s.when(undo_error("order", 2));
    assert_eq!(s.events(), ["attempt_failed", "compensation_failed"]);
    assert_eq!(s.status(), SagaStatus::CompensationFailed);
    assert!(
        s.clone()
            .when(retry_due("order", Direction::Compensate, 3))
            .ignored()
    );
}

#[test]
fn a_compensation_whose_participant_is_silent_is_asked_again_and_never_fails() {
    let mut s = compensating_order();
    for attempt in 1..=10 {
        s = s.when(timed_out("order", Direction::Compensate, attempt));
        assert_eq!(s.events(), ["attempt_timed_out", "command_sent"]);
        assert_eq!(s.commands(), [comp("order", attempt + 1)]);
        assert_eq!(s.status(), SagaStatus::Compensating);
    }
    let s = s.when(undone("order", 3));
    assert_eq!(s.events(), ["step_compensated", "saga_compensated"]);
}

#[test]
fn a_compensation_that_fails_for_business_reasons_waits_for_an_operator_at_once() {
    let s = compensating_order().when(undo_fail("order", 1));
    assert_eq!(s.events(), ["compensation_failed"]);
    assert_eq!(s.status(), SagaStatus::CompensationFailed);
}

#[test]
fn an_operator_retry_gives_the_compensation_a_fresh_budget() {
    let s = compensating_order()
        .and([undo_fail("order", 1)])
        .when(operator(OperatorCommand::RetryCompensation));
    assert_eq!(s.events(), ["compensation_retry_requested", "command_sent"]);
    assert_eq!(s.commands(), [comp("order", 2)]);
    let s = s.when(undo_error("order", 2));
    assert_eq!(
        s.events(),
        ["attempt_failed", "retry_scheduled"],
        "budget of 2 starts again"
    );
    let s = s
        .and([retry_due("order", Direction::Compensate, 3)])
        .when(undone("order", 3));
    assert_eq!(s.status(), SagaStatus::Compensated);
}

#[test]
fn an_operator_can_mark_the_failed_step_compensated_by_hand() {
    let s = given(checkout())
        .started()
        .and([
            ok("order", 1, json!({})),
            ok("stock", 1, json!({})),
            fail("pay", 1, "declined"),
        ])
        .and([undo_fail("stock", 1)]);
    let wrong = s.clone().when(operator(OperatorCommand::MarkCompensated {
        step: "order".into(),
    }));
    assert!(wrong.rejected());
    let s = s.when(operator(OperatorCommand::MarkCompensated {
        step: "stock".into(),
    }));
    assert_eq!(s.events(), ["step_compensated", "command_sent"]);
    assert_eq!(s.commands(), [comp("order", 1)]);
}

#[test]
fn a_late_compensation_success_resolves_a_failed_compensation() {
    let s = compensating_order().and([
        undo_error("order", 1),
        retry_due("order", Direction::Compensate, 2),
        undo_error("order", 2),
    ]);
    assert_eq!(s.status(), SagaStatus::CompensationFailed);
    let s = s.when(undone("order", 1));
    assert_eq!(s.events(), ["step_compensated", "saga_compensated"]);
}

#[test]
fn an_abort_compensates_a_running_saga() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({}))])
        .when(abort());
    assert_eq!(
        s.events(),
        ["abort_requested", "compensation_started", "command_sent"]
    );
    assert_eq!(s.status(), SagaStatus::Compensating);
    assert!(s.clone().when(abort()).rejected(), "no longer running");
    assert!(
        s.when(ok("stock", 1, json!({})))
            .decision()
            .commands
            .is_empty(),
        "no action after compensation began"
    );
}

#[test]
fn an_abort_after_the_pivot_is_rejected() {
    let s = given(checkout())
        .started()
        .and([
            ok("order", 1, json!({})),
            ok("stock", 1, json!({})),
            ok("pay", 1, json!({})),
        ])
        .when(abort());
    assert!(s.rejected());
    assert_eq!(s.status(), SagaStatus::Running);
}

#[test]
fn an_abort_during_the_pivot_waits_for_its_outcome() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))])
        .when(abort());
    assert_eq!(s.events(), ["abort_requested"]);
    let completes = s
        .clone()
        .and([ok("pay", 1, json!({})), ok("ship", 1, json!({}))]);
    assert_eq!(completes.status(), SagaStatus::Completed);
    let compensates = s.when(error("pay", 1, "gateway down"));
    assert_eq!(
        compensates.events(),
        [
            "attempt_failed",
            "step_failed",
            "compensation_started",
            "command_sent"
        ]
    );
}

#[test]
fn operator_commands_on_a_saga_without_a_failed_compensation_are_rejected() {
    let s = given(checkout()).started();
    assert!(
        s.clone()
            .when(operator(OperatorCommand::RetryCompensation))
            .rejected()
    );
    assert!(
        s.when(operator(OperatorCommand::MarkCompensated {
            step: "order".into()
        }))
        .rejected()
    );
}

// --- deadline -------------------------------------------------------------------------------

fn with_deadline() -> saga_engine::SagaDefinition {
    let mut def = checkout();
    def.deadline = Some(Duration::from_secs(60));
    def
}

#[test]
fn the_deadline_is_scheduled_at_start_and_compensates_when_it_passes() {
    let s = given(with_deadline()).started();
    assert!(
        s.scheduled()
            .contains(&(TimerKind::Deadline, t0() + Duration::from_secs(60)))
    );
    let s = s
        .and([ok("order", 1, json!({}))])
        .after(Duration::from_secs(60))
        .when(deadline());
    assert_eq!(
        s.events(),
        ["deadline_exceeded", "compensation_started", "command_sent"]
    );
    assert_eq!(
        s.commands(),
        [comp("stock", 1)],
        "the in-flight step may have run"
    );
}

#[test]
fn the_deadline_waits_for_an_in_flight_pivot() {
    let s = given(with_deadline())
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))])
        .when(deadline());
    assert_eq!(s.events(), ["deadline_exceeded"]);
    let s = s.when(ok("pay", 1, json!({})));
    assert_eq!(s.commands(), [exec("ship", 1)]);
}

#[test]
fn the_deadline_no_longer_applies_past_the_pivot() {
    let s = given(with_deadline()).started().and([
        ok("order", 1, json!({})),
        ok("stock", 1, json!({})),
        ok("pay", 1, json!({})),
    ]);
    assert!(s.cancelled().contains(&TimerKind::Deadline));
    assert!(s.when(deadline()).ignored());
}

// --- pivot and retriable steps ----------------------------------------------------------------

fn past_the_pivot() -> Scenario {
    given(checkout()).started().and([
        ok("order", 1, json!({})),
        ok("stock", 1, json!({})),
        ok("pay", 1, json!({})),
    ])
}

#[test]
fn a_retriable_step_is_retried_without_bound_and_never_compensated() {
    let mut s = past_the_pivot();
    for attempt in (1..=12).step_by(2) {
        s = s.when(timed_out("ship", Direction::Execute, attempt));
        assert_eq!(s.commands(), [exec("ship", attempt + 1)]);
        s = s.when(error("ship", attempt + 1, "carrier api down"));
        assert_eq!(
            s.events(),
            ["attempt_failed", "retry_scheduled"],
            "attempt {attempt}"
        );
        s = s.when(retry_due("ship", Direction::Execute, attempt + 2));
        assert_eq!(s.commands(), [exec("ship", attempt + 2)]);
    }
    let s = s.when(ok("ship", 13, json!({})));
    assert_eq!(s.status(), SagaStatus::Completed);
}

#[test]
fn a_definitive_failure_past_the_point_of_no_return_waits_for_an_operator() {
    let s = past_the_pivot().when(fail("ship", 1, "address not deliverable"));
    assert_eq!(s.events(), ["completion_failed"]);
    assert_eq!(s.status(), SagaStatus::CompletionFailed);
    assert!(
        s.decision().commands.is_empty() && s.scheduled().is_empty(),
        "no loop"
    );
    // Its own recorded failure, repeated, changes nothing.
    assert!(
        s.clone()
            .when(fail("ship", 1, "address not deliverable"))
            .ignored()
    );
    assert!(s.clone().when(abort()).rejected());
    assert_eq!(
        s.clone()
            .when(operator(OperatorCommand::RetryCompensation))
            .outcome(),
        &Outcome::Rejected(Rejection::NoFailedCompensation(
            SagaStatus::CompletionFailed
        ))
    );
}

#[test]
fn an_operator_retries_the_failed_step_with_a_fresh_budget() {
    let s = past_the_pivot()
        .and([fail("ship", 1, "address not deliverable")])
        .when(operator(OperatorCommand::RetryStep));
    assert_eq!(s.events(), ["step_retry_requested", "command_sent"]);
    assert_eq!(s.commands(), [exec("ship", 2)]);
    assert_eq!(s.status(), SagaStatus::Running);
    assert_eq!(
        s.clone()
            .when(fail("ship", 1, "address not deliverable"))
            .outcome(),
        &Outcome::Ignored(Ignored::EarlierBudget {
            step: "ship".into(),
            attempt: 1
        }),
        "the failure the operator dealt with does not stop the saga again"
    );
    let s = s.when(ok("ship", 2, json!({})));
    assert_eq!(s.status(), SagaStatus::Completed);
}

#[test]
fn an_operator_marks_the_failed_step_done_by_hand() {
    let s = past_the_pivot().and([fail("ship", 1, "address not deliverable")]);
    let wrong = s.clone().when(operator(OperatorCommand::MarkCompleted {
        step: "pay".into(),
        output: Data::new(),
    }));
    assert_eq!(
        wrong.outcome(),
        &Outcome::Rejected(Rejection::NotTheFailedStep {
            step: "pay".into(),
            failed: "ship".into()
        })
    );
    let s = s.when(operator(OperatorCommand::MarkCompleted {
        step: "ship".into(),
        output: object(json!({"tracking": "by hand"})),
    }));
    assert_eq!(s.events(), ["step_completed", "saga_completed"]);
    assert_eq!(s.state.as_ref().unwrap().data["tracking"], "by hand");
    assert_eq!(s.status(), SagaStatus::Completed);
}

/// Past the pivot, a retriable step whose participant keeps answering with retryable errors
/// (a cause that never goes away) is retried without end.
fn stuck_past_the_pivot() -> Scenario {
    past_the_pivot().and([
        error("ship", 1, "carrier rejects the parcel"),
        retry_due("ship", Direction::Execute, 2),
        error("ship", 2, "carrier rejects the parcel"),
    ])
}

#[test]
fn an_operator_marks_a_step_that_keeps_failing_past_the_pivot_done_by_hand() {
    let s = stuck_past_the_pivot();
    assert_eq!(s.status(), SagaStatus::Running);
    assert!(s.clone().when(abort()).rejected(), "too late to abort");
    let s = s.when(operator(OperatorCommand::MarkCompleted {
        step: "ship".into(),
        output: object(json!({"tracking": "by hand"})),
    }));
    assert_eq!(s.events(), ["step_completed", "saga_completed"]);
    assert_eq!(
        s.cancelled(),
        [TimerKind::Retry {
            step: "ship".into(),
            direction: Direction::Execute,
            attempt: 3
        }],
        "the pending retry is called off"
    );
    assert_eq!(s.state.as_ref().unwrap().data["tracking"], "by hand");
    assert_eq!(s.status(), SagaStatus::Completed);
    // The retry timer, had it fired meanwhile, and a late answer change nothing.
    assert!(
        s.clone()
            .when(retry_due("ship", Direction::Execute, 3))
            .ignored()
    );
    assert!(s.when(ok("ship", 2, json!({}))).ignored());
}

#[test]
fn an_operator_marks_a_step_done_while_an_attempt_is_in_flight() {
    let s = stuck_past_the_pivot()
        .and([retry_due("ship", Direction::Execute, 3)])
        .when(operator(OperatorCommand::MarkCompleted {
            step: "ship".into(),
            output: Data::new(),
        }));
    assert_eq!(s.events(), ["step_completed", "saga_completed"]);
    assert_eq!(
        s.cancelled(),
        [TimerKind::StepTimeout {
            step: "ship".into(),
            direction: Direction::Execute,
            attempt: 3
        }]
    );
    assert!(
        s.when(timed_out("ship", Direction::Execute, 3)).ignored(),
        "its timeout no longer asks again"
    );
}

#[test]
fn an_operator_retries_a_step_that_keeps_failing_past_the_pivot_at_once() {
    let s = stuck_past_the_pivot().when(operator(OperatorCommand::RetryStep));
    assert_eq!(s.events(), ["step_retry_requested", "command_sent"]);
    assert_eq!(s.commands(), [exec("ship", 3)]);
    assert!(s.cancelled().contains(&TimerKind::Retry {
        step: "ship".into(),
        direction: Direction::Execute,
        attempt: 3
    }));
    assert_eq!(s.status(), SagaStatus::Running);
    let state = s.state.as_ref().unwrap().step("ship").unwrap().clone();
    assert_eq!(
        (state.action.errors, state.action.budget_start),
        (0, 2),
        "a fresh budget: the backoff starts again from its first delay"
    );
    // The scheduled retry of attempt 3, had it fired meanwhile, sends nothing more.
    assert!(
        s.clone()
            .when(retry_due("ship", Direction::Execute, 3))
            .ignored()
    );
    let s = s.when(ok("ship", 3, json!({})));
    assert_eq!(s.status(), SagaStatus::Completed);
}

#[test]
fn an_operator_cannot_skip_or_retry_a_step_before_the_point_of_no_return() {
    // Before the pivot, abort is the way out; a step is not marked done over its saga's head.
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({})), error("stock", 1, "busy")]);
    for command in [
        OperatorCommand::RetryStep,
        OperatorCommand::MarkCompleted {
            step: "stock".into(),
            output: Data::new(),
        },
    ] {
        assert_eq!(
            s.clone().when(operator(command)).outcome(),
            &Outcome::Rejected(Rejection::NotPastPointOfNoReturn)
        );
    }
    // Past it, only the step that is stuck may be marked.
    let wrong = stuck_past_the_pivot().when(operator(OperatorCommand::MarkCompleted {
        step: "pay".into(),
        output: Data::new(),
    }));
    assert_eq!(
        wrong.outcome(),
        &Outcome::Rejected(Rejection::NotTheFailedStep {
            step: "pay".into(),
            failed: "ship".into()
        })
    );
    // A settled saga has nothing to retry.
    let done = stuck_past_the_pivot().and([ok("ship", 2, json!({}))]);
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(
        done.when(operator(OperatorCommand::RetryStep)).outcome(),
        &Outcome::Rejected(Rejection::NoFailedStep(SagaStatus::Completed))
    );
}

#[test]
fn without_a_pivot_the_first_retriable_step_is_the_point_of_no_return() {
    let def = saga(vec![
        step("a", StepKind::Compensatable),
        step("b", StepKind::Retriable),
    ]);
    let s = given(def)
        .started()
        .and([ok("a", 1, json!({}))])
        .when(abort());
    assert!(s.rejected());
}

#[test]
fn a_pivot_failure_is_final_and_the_pivot_is_not_compensated() {
    let s = given(checkout())
        .started()
        .and([ok("order", 1, json!({})), ok("stock", 1, json!({}))])
        .when(fail("pay", 1, "declined"));
    assert_eq!(s.commands(), [comp("stock", 1)]);
    let s = s.and([undone("stock", 1), undone("order", 1)]);
    assert_eq!(s.status(), SagaStatus::Compensated);
    let log = &s.log;
    assert!(!log.iter().any(|e| matches!(e,
        saga_schemas::SagaEvent::CommandSent { step, direction: Direction::Compensate, .. } if step == "pay")));
}

#[test]
fn commands_carry_deterministic_message_ids() {
    let a = given(checkout()).started();
    let b = given(checkout()).started();
    assert_eq!(
        a.decision().commands[0].message_id,
        b.decision().commands[0].message_id
    );
    let retry = given(retrying(2))
        .started()
        .and([ok("order", 1, json!({})), error("stock", 1, "x")])
        .when(retry_due("stock", Direction::Execute, 2));
    let first = given(retrying(2)).started().when(ok("order", 1, json!({})));
    assert_ne!(
        retry.decision().commands[0].message_id,
        first.decision().commands[0].message_id
    );
}

#[test]
fn a_decision_is_deterministic() {
    let def = checkout();
    let s = given(checkout()).started();
    let input = Input::operator(OperatorCommand::Abort { reason: "x".into() });
    let a = decide(&def, s.state.as_ref(), &input, t0());
    let b = decide(&def, s.state.as_ref(), &input, t0());
    assert_eq!(a, b);
}
