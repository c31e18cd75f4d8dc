//! A saga definition drawn as a Mermaid flowchart.
//!
//! The forward path runs `start -> step 1 -> ... -> completed`. Every step that can fail (a
//! compensatable step or the pivot) has a dotted `fails` edge into the compensation chain, which
//! undoes the compensatable steps completed before it in reverse order and ends in
//! `compensated`. A retriable step cannot fail: it has a `retry` loop instead. Node shapes follow
//! the kind: rectangles for compensatable steps, a hexagon for the pivot, rounded boxes for
//! retriable steps. A parallel group forks into its steps and joins after them; its
//! compensations form a subgraph, run in reverse order of completion.

use std::fmt::Write;

use crate::definition::{SagaDefinition, StepKind};

/// The Mermaid flowchart of one saga.
pub fn mermaid(def: &SagaDefinition) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "flowchart TD");
    let _ = writeln!(
        w,
        "    start([\"{}\"])",
        label(&format!("start {}", def.name))
    );
    for (i, step) in def.steps.iter().enumerate() {
        let text = label(&format!(
            "{}<br/>{}: {}",
            step.name, step.participant, step.action
        ));
        let id = step_id(i, &step.name);
        let _ = match step.kind {
            StepKind::Compensatable => writeln!(w, "    {id}[\"{text}\"]"),
            StepKind::Pivot => writeln!(w, "    {id}{{{{\"{text}\"}}}}"),
            StepKind::Retriable => writeln!(w, "    {id}(\"{text}\")"),
        };
    }
    let _ = writeln!(w, "    completed([\"completed\"])");
    let compensatable: Vec<usize> = def
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind == StepKind::Compensatable)
        .map(|(i, _)| i)
        .collect();
    let fails = def.steps.iter().any(|s| s.kind != StepKind::Retriable);
    for &i in &compensatable {
        let step = &def.steps[i];
        let text = label(&format!(
            "undo {}<br/>{}: {}",
            step.name,
            step.participant,
            step.compensation.as_deref().unwrap_or("")
        ));
        let _ = writeln!(w, "    {}[\"{text}\"]", undo_id(i, &step.name));
    }
    if fails {
        let _ = writeln!(w, "    compensated([\"compensated\"])");
    }

    // The forward path; a parallel group forks into its steps and joins after them.
    let stages = def.stages();
    let mut previous = "start".to_owned();
    for stage in &stages {
        if stage.len() == 1 {
            let id = step_id(stage.start, &def.steps[stage.start].name);
            let _ = writeln!(w, "    {previous} --> {id}");
            previous = id;
            continue;
        }
        let (fork, join) = (
            format!("fork{}", stage.start),
            format!("join{}", stage.start),
        );
        let _ = writeln!(w, "    {fork}((\"fork\"))");
        let _ = writeln!(w, "    {join}((\"join\"))");
        let _ = writeln!(w, "    {previous} --> {fork}");
        for i in stage.clone() {
            let id = step_id(i, &def.steps[i].name);
            let _ = writeln!(w, "    {fork} --> {id}");
            let _ = writeln!(w, "    {id} --> {join}");
        }
        previous = join;
    }
    let _ = writeln!(w, "    {previous} --> completed");

    // What undoes each stage: one compensation, or a parallel group's compensations as a
    // subgraph (run in reverse order of completion, which only the run knows).
    let undo_stage = |stage: &std::ops::Range<usize>| -> Option<String> {
        let mine: Vec<usize> = compensatable
            .iter()
            .copied()
            .filter(|c| stage.contains(c))
            .collect();
        match mine.as_slice() {
            [] => None,
            [one] if stage.len() == 1 => Some(undo_id(*one, &def.steps[*one].name)),
            _ => Some(format!("undo{}", stage.start)),
        }
    };
    let undo_stages: Vec<(usize, String)> = stages
        .iter()
        .filter_map(|stage| undo_stage(stage).map(|id| (stage.start, id)))
        .collect();
    for stage in stages.iter().filter(|s| s.len() > 1) {
        if let Some(id) = undo_stage(stage) {
            let _ = writeln!(
                w,
                "    subgraph {id} [\"undo in reverse order of completion\"]"
            );
            for i in stage.clone() {
                let _ = writeln!(w, "        {}", undo_id(i, &def.steps[i].name));
            }
            let _ = writeln!(w, "    end");
        }
    }

    // Failures, and the retry loops of steps that cannot fail. A step of a group that fails
    // leads to its own group's compensations: its siblings may have completed.
    for (i, step) in def.steps.iter().enumerate() {
        let id = step_id(i, &step.name);
        if step.kind == StepKind::Retriable {
            let _ = writeln!(w, "    {id} -->|retry| {id}");
            continue;
        }
        let stage = def.stage(i);
        let target = undo_stages
            .iter()
            .rev()
            .find(|(start, _)| *start < stage.start || (stage.len() > 1 && *start == stage.start))
            .map(|(_, id)| id.clone())
            .unwrap_or_else(|| "compensated".to_owned());
        let _ = writeln!(w, "    {id} -.->|fails| {target}");
    }

    // The compensation chain, newest first.
    for pair in undo_stages.windows(2).rev() {
        let _ = writeln!(w, "    {} --> {}", pair[1].1, pair[0].1);
    }
    if let Some((_, first)) = undo_stages.first() {
        let _ = writeln!(w, "    {first} --> compensated");
    }

    let _ = writeln!(w, "    classDef undo stroke-dasharray: 5 3");
    if !compensatable.is_empty() {
        let ids: Vec<String> = compensatable
            .iter()
            .map(|&i| undo_id(i, &def.steps[i].name))
            .collect();
        let _ = writeln!(w, "    class {} undo", ids.join(","));
    }
    out
}

/// The node id of step `index`: its position keeps ids unique whatever the names sanitise to.
/// Public so that a viewer can style the nodes (`class ID ...`) of one saga's steps.
pub fn step_id(index: usize, name: &str) -> String {
    format!("s{index}_{}", sanitize(name))
}

/// The node id of the compensation of step `index`.
pub fn undo_id(index: usize, name: &str) -> String {
    format!("c{index}_{}", sanitize(name))
}

/// Letters, digits and `_` only: a valid Mermaid node id.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Text for inside a double-quoted Mermaid label; keeps the `<br/>` line breaks this module adds.
fn label(text: &str) -> String {
    text.split("<br/>")
        .map(|part| {
            part.replace('#', "#35;")
                .replace('"', "#quot;")
                .replace('<', "#lt;")
                .replace('>', "#gt;")
        })
        .collect::<Vec<_>>()
        .join("<br/>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Definitions;

    const EXAMPLE: &str = include_str!("../../sagas.yaml");

    fn edges(chart: &str) -> Vec<&str> {
        chart
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("-->") || l.contains("-.->"))
            .collect()
    }

    #[test]
    fn the_example_saga_has_its_forward_failure_and_compensation_edges() {
        let defs = Definitions::parse("sagas.yaml", EXAMPLE).unwrap();
        let chart = mermaid(defs.get("order-checkout").unwrap());
        assert!(chart.starts_with("flowchart TD\n"), "{chart}");
        assert_eq!(
            edges(&chart),
            [
                "start --> s0_create_order",
                "s0_create_order --> s1_reserve_stock",
                "s1_reserve_stock --> s2_charge_payment",
                "s2_charge_payment --> s3_schedule_shipment",
                "s3_schedule_shipment --> s4_approve_order",
                "s4_approve_order --> completed",
                "s0_create_order -.->|fails| compensated",
                "s1_reserve_stock -.->|fails| c0_create_order",
                "s2_charge_payment -.->|fails| c1_reserve_stock",
                "s3_schedule_shipment -->|retry| s3_schedule_shipment",
                "s4_approve_order -->|retry| s4_approve_order",
                "c1_reserve_stock --> c0_create_order",
                "c0_create_order --> compensated",
            ],
            "{chart}"
        );
        assert!(chart.contains(r#"s2_charge_payment{{"charge-payment<br/>payments: charge"}}"#));
        assert!(chart.contains(r#"c1_reserve_stock["undo reserve-stock<br/>inventory: release"]"#));
        assert!(
            chart.contains(r#"s3_schedule_shipment("schedule-shipment<br/>shipping: schedule")"#)
        );
    }

    #[test]
    fn names_are_sanitised_into_ids_and_escaped_in_labels() {
        let yaml = r#"
sagas:
  - name: odd
    steps:
      - name: 'say "hi" #1'
        participant: p
        action: "a<b>"
        compensation: undo
      - name: say-hi-1
        participant: p
        action: b
        kind: pivot
"#;
        let defs = Definitions::parse("odd.yaml", yaml).unwrap();
        let chart = mermaid(&defs.sagas[0]);
        assert!(
            chart.contains(r#"s0_say__hi___1["say #quot;hi#quot; #35;1<br/>p: a#lt;b#gt;"]"#),
            "{chart}"
        );
        assert!(
            chart.contains("s1_say_hi_1 -.->|fails| c0_say__hi___1"),
            "{chart}"
        );
        assert!(chart.contains("c0_say__hi___1 --> compensated"), "{chart}");
    }

    #[test]
    fn a_group_forks_and_joins_and_is_undone_as_a_subgraph() {
        let defs = Definitions::parse(
            "parallel.yaml",
            include_str!("../../examples/parallel.yaml"),
        )
        .unwrap();
        let chart = mermaid(defs.get("parallel-checkout").unwrap());
        assert_eq!(
            edges(&chart),
            [
                "start --> s0_create_order",
                "s0_create_order --> fork1",
                "fork1 --> s1_reserve_stock",
                "s1_reserve_stock --> join1",
                "fork1 --> s2_take_payment",
                "s2_take_payment --> join1",
                "join1 --> s3_schedule_shipment",
                "s3_schedule_shipment --> s4_approve_order",
                "s4_approve_order --> completed",
                "s0_create_order -.->|fails| compensated",
                "s1_reserve_stock -.->|fails| undo1",
                "s2_take_payment -.->|fails| undo1",
                "s3_schedule_shipment -->|retry| s3_schedule_shipment",
                "s4_approve_order -->|retry| s4_approve_order",
                "undo1 --> c0_create_order",
                "c0_create_order --> compensated",
            ],
            "{chart}"
        );
        assert!(
            chart.contains(
                "    subgraph undo1 [\"undo in reverse order of completion\"]\n        \
                 c1_reserve_stock\n        c2_take_payment\n    end\n"
            ),
            "{chart}"
        );
        assert!(chart.contains(r#"    fork1(("fork"))"#), "{chart}");
    }

    #[test]
    fn a_saga_of_retriable_steps_only_cannot_be_compensated() {
        let yaml = "sagas:\n  - name: r\n    steps:\n      - {name: a, participant: p, action: x, kind: retriable}\n";
        let defs = Definitions::parse("r.yaml", yaml).unwrap();
        let chart = mermaid(&defs.sagas[0]);
        assert!(!chart.contains("compensated"), "{chart}");
        assert!(!chart.contains("fails"), "{chart}");
        assert!(chart.contains("s0_a -->|retry| s0_a"), "{chart}");
    }
}
