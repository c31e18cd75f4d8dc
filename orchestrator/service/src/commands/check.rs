//! `orchestrator check FILE [--saga NAME]`

use std::time::{Duration, Instant};

use anyhow::bail;
use saga_engine::check::{Bounds, Ending, Report, explore};

use crate::cli::{CheckArgs, Format};
use crate::definitions;

pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let defs = definitions::load(std::slice::from_ref(&args.file))?;
    let sagas: Vec<_> = match &args.saga {
        Some(name) => match defs.get(name) {
            Some(saga) => vec![saga],
            None => bail!("unknown saga `{name}` in {}", args.file.display()),
        },
        None => defs.sagas.iter().collect(),
    };
    let bounds = Bounds {
        faults: args.faults,
        max_moves: args.max_moves,
        operator_abort: !args.no_abort,
    };
    let mut reports = Vec::new();
    for saga in sagas {
        let began = Instant::now();
        let report = explore(saga, bounds);
        reports.push((report, began.elapsed()));
    }
    match args.format {
        Format::Text => {
            for (report, elapsed) in &reports {
                print!(
                    "{}",
                    text(report, &args.file.display().to_string(), *elapsed)
                );
            }
        }
        Format::Json => {
            let json: Vec<serde_json::Value> = reports
                .iter()
                .map(|(report, elapsed)| {
                    let mut value = serde_json::to_value(report).expect("a report serialises");
                    value["elapsed_ms"] = serde_json::json!(elapsed.as_millis() as u64);
                    value["mermaid"] = serde_json::json!(report.mermaid());
                    value
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
    }
    let broken: usize = reports.iter().map(|(r, _)| r.violations.len()).sum();
    let truncated: u64 = reports.iter().map(|(r, _)| r.truncated).sum();
    if broken > 0 {
        bail!("{broken} invariant(s) broken");
    }
    if truncated > 0 {
        bail!(
            "{truncated} path(s) longer than --max-moves {}",
            args.max_moves
        );
    }
    Ok(())
}

fn text(report: &Report, file: &str, elapsed: Duration) -> String {
    let mut out = format!(
        "saga {} in {file}: {} paths, {} decisions, in {} (at most {} fault{} per path{})\n",
        report.saga,
        report.paths,
        report.decisions,
        duration(elapsed),
        report.bounds.faults,
        if report.bounds.faults == 1 { "" } else { "s" },
        if report.bounds.operator_abort {
            ", operator aborts included"
        } else {
            ""
        }
    );
    let witness = |steps: &[String]| -> String {
        steps
            .iter()
            .enumerate()
            .map(|(i, step)| format!("      {}. {step}\n", i + 1))
            .collect()
    };
    let ending = |ending: &Ending| -> String {
        format!(
            "  {}{}: {} paths; shortest:\n{}",
            ending.status.as_str(),
            ending
                .cause
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default(),
            ending.paths,
            witness(&ending.witness)
        )
    };
    out += "\noutcomes:\n";
    for e in report.outcomes.iter().filter(|e| !e.needs_operator) {
        out += &ending(e);
    }
    out += "\nneeds an operator:\n";
    let operator: Vec<&Ending> = report
        .outcomes
        .iter()
        .filter(|e| e.needs_operator)
        .collect();
    if operator.is_empty() {
        out += "  never, within these bounds\n";
    }
    for e in operator {
        out += &ending(e);
    }
    out += "\ninvariants (replay, reverse-order compensation (a group's steps in reverse order of \
            completion), no compensation while a group's step awaits its answer, no \
            compensation of a pivot or past the point of no return, every completed step undone \
            in a compensated saga, no command after the end, retry budgets):\n";
    if report.violations.is_empty() {
        out += "  hold on every path\n";
    }
    for violation in &report.violations {
        out += &format!(
            "  BROKEN: {}; witness:\n{}",
            violation.invariant,
            witness(&violation.witness)
        );
    }
    if report.truncated > 0 {
        out += &format!(
            "\n{} paths were cut at {} moves\n",
            report.truncated, report.bounds.max_moves
        );
    }
    out += &format!("\n```mermaid\n{}```\n\n", report.mermaid());
    out
}

fn duration(elapsed: Duration) -> String {
    if elapsed >= Duration::from_secs(1) {
        format!("{:.1} s", elapsed.as_secs_f64())
    } else {
        format!("{} ms", elapsed.as_millis())
    }
}
