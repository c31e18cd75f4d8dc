//! The `orchestrator` binary's `validate`, `graph` and `check` subcommands, run as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas.yaml")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the orchestrator binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// A file of this test's own in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("orchestrator-cli-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const BROKEN: &str = "sagas:
  - name: checkout
    steps:
      - name: create
        participant: orders
        action: create
      - name: charge
        participant: payments
        action: charge
        kind: pivot
        timeout: 0s
      - name: charge
        participant: pay ments
        action: charge
        kind: pivot
";

#[test]
fn validate_accepts_the_example() {
    let path = example();
    let output = run(&["validate", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with("ok  order-checkout (5 steps, version "),
        "{out}"
    );
    assert!(
        lines[0].ends_with(&format!(") in {}", path.display())),
        "{out}"
    );
    assert_eq!(stderr(&output), "");
}

#[test]
fn validate_rejects_a_broken_file_listing_each_error() {
    let file = TempFile::new("broken.yaml", BROKEN);
    let output = run(&["validate", file.path()]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(stdout(&output), "", "no saga is reported valid");
    let err = stderr(&output);
    let p = file.path();
    for expected in [
        format!(
            "{p}:4:9: saga `checkout`, step `create`: a compensatable step needs `compensation`"
        ),
        format!("{p}:11:18: saga `checkout`, step `charge`: `timeout` must be greater than zero"),
        format!("{p}:12:15: saga `checkout`, step `charge`: duplicate step name"),
        format!("{p}:13:22: saga `checkout`, step `charge`: invalid participant name `pay ments`"),
        format!("{p}:15:15: saga `checkout`, step `charge`: more than one pivot"),
    ] {
        assert!(
            err.lines().any(|line| line.starts_with(&expected)),
            "missing `{expected}` in:\n{err}"
        );
    }
    assert!(
        err.ends_with("error: 5 errors in the saga definitions\n"),
        "{err}"
    );
}

#[test]
fn validate_checks_several_files_as_one_set() {
    let path = example();
    let twin = TempFile::new("twin.yaml", &std::fs::read_to_string(&path).unwrap());
    let output = run(&["validate", path.to_str().unwrap(), twin.path()]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains(&format!("{}:", twin.path()))
            && err.contains("duplicate saga name: `order-checkout`"),
        "{err}"
    );
}

#[test]
fn validate_names_a_file_it_cannot_read() {
    let path = example();
    let output = run(&["validate", path.to_str().unwrap(), "no/such/sagas.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.lines()
            .any(|l| l.starts_with("no/such/sagas.yaml: cannot read")),
        "{err}"
    );
}

#[test]
fn validate_needs_a_file() {
    let output = run(&["validate"]);
    assert_eq!(output.status.code(), Some(2), "clap's usage error");
}

#[test]
fn graph_prints_a_mermaid_flowchart() {
    let path = example();
    let output = run(&["graph", path.to_str().unwrap(), "--saga", "order-checkout"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(out.starts_with("flowchart"), "{out}");
    assert!(
        out.contains("s2_charge_payment -.->|fails| c1_reserve_stock"),
        "{out}"
    );
}

#[test]
fn graph_of_an_unknown_saga_lists_the_known_ones() {
    let path = example();
    let output = run(&["graph", path.to_str().unwrap(), "--saga", "refund"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    let err = stderr(&output);
    assert!(
        err.contains("unknown saga `refund`") && err.contains("known sagas: `order-checkout`"),
        "{err}"
    );
}

#[test]
fn graph_of_an_invalid_file_shows_its_errors() {
    let file = TempFile::new("graph-broken.yaml", BROKEN);
    let output = run(&["graph", file.path(), "--saga", "checkout"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("more than one pivot"), "{err}");
}

#[test]
fn check_explores_the_example_and_finds_the_invariants_hold() {
    let path = example();
    let output = run(&["check", path.to_str().unwrap(), "--faults", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(
        out.starts_with("saga order-checkout in ") && out.contains(" paths, "),
        "{out}"
    );
    assert!(out.contains("\noutcomes:\n  completed: "), "{out}");
    assert!(out.contains("\nneeds an operator:\n  "), "{out}");
    assert!(out.contains("compensation_failed ("), "{out}");
    assert!(out.contains("  hold on every path\n"), "{out}");
    assert!(out.contains("```mermaid\nstateDiagram-v2\n"), "{out}");
}

#[test]
fn check_prints_json_for_machines() {
    let path = example();
    let output = run(&[
        "check",
        path.to_str().unwrap(),
        "--saga",
        "order-checkout",
        "--faults",
        "1",
        "--format",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let report = &json[0];
    assert_eq!(report["saga"], "order-checkout");
    assert_eq!(report["bounds"]["faults"], 1);
    assert!(report["paths"].as_u64().unwrap() > 1);
    assert_eq!(report["violations"], serde_json::json!([]));
    let outcomes = report["outcomes"].as_array().unwrap();
    assert_eq!(outcomes[0]["status"], "completed");
    assert!(outcomes[0]["witness"][0] == "the saga starts");
    assert!(
        report["mermaid"]
            .as_str()
            .unwrap()
            .starts_with("stateDiagram-v2")
    );
}

#[test]
fn check_of_an_unknown_saga_says_so() {
    let path = example();
    let output = run(&["check", path.to_str().unwrap(), "--saga", "refund"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("unknown saga `refund`"));
}
