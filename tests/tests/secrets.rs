//! Passwords in `AMQP_URL` and `DATABASE_URL` never reach a terminal: not through `--help`
//! (clap would print environment values) and not through the error about an unsupported
//! database URL (sea-orm's would echo it whole).
//!
//! The binaries must be built (`cargo test --workspace` builds them).

use std::process::{Command, Output};

use saga_system::{bins, system::default_config_path};

const SECRET: &str = "S3CRET-pw";

fn run(binary: &str, args: &[&str], env: &[(&str, String)]) -> Output {
    let path = bins::find(binary).unwrap_or_else(|e| panic!("{e:#}"));
    let mut command = Command::new(path);
    command.args(args).env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running {binary}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn secret_urls() -> Vec<(&'static str, String)> {
    vec![
        ("AMQP_URL", format!("amqp://app:{SECRET}@127.0.0.1:1/%2f")),
        (
            "DATABASE_URL",
            format!("postgres://app:{SECRET}@127.0.0.1:1/db"),
        ),
    ]
}

#[test]
fn help_names_the_url_variables_without_their_values() {
    for (binary, args) in [
        ("orchestrator", &["run", "--help"][..]),
        ("payments", &["--help"][..]),
    ] {
        let output = run(binary, args, &secret_urls());
        let help = text(&output);
        assert!(output.status.success(), "{binary} --help failed:\n{help}");
        assert!(
            help.contains("AMQP_URL") && help.contains("DATABASE_URL"),
            "{binary} --help should still name the variables:\n{help}"
        );
        assert!(!help.contains(SECRET), "{binary} --help leaks:\n{help}");
    }
}

#[test]
fn an_unsupported_database_url_is_refused_without_its_password() {
    let config = default_config_path();
    let config = config.to_str().expect("a UTF-8 path");
    let env = [(
        "DATABASE_URL",
        format!("mysql://root:{SECRET}@127.0.0.1:3306/app"),
    )];
    for (binary, args) in [
        ("orchestrator", &["run", "--config", config][..]),
        ("payments", &[][..]),
    ] {
        let output = run(binary, args, &env);
        let said = text(&output);
        assert!(!output.status.success(), "{binary} should refuse:\n{said}");
        assert!(
            said.contains("unsupported database URL") && said.contains("mysql://root:***@"),
            "{binary} should say which URL it refuses, redacted:\n{said}"
        );
        assert!(!said.contains(SECRET), "{binary} leaks:\n{said}");
    }
}
