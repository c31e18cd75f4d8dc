//! The `shipping` participant: schedules shipments, optionally failing some attempts
//! transiently.

use clap::Parser;
use saga_examples::{books::Service, cli::CommonArgs, shipping};

#[derive(Debug, Parser)]
#[command(version, about = "The shipping participant of the order-checkout saga")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Share of attempts (0 to 1) that fail with a retryable error, chosen by a hash of
    /// (saga id, attempt), so a run is reproducible.
    #[arg(long, env = "SHIPPING_FAILURE_RATE", default_value_t = 0.0, value_parser = rate)]
    shipping_failure_rate: f64,
    /// Attempts after this one always succeed, so a shipment is eventually scheduled.
    #[arg(long, env = "SHIPPING_MAX_FAILURES", default_value_t = 3)]
    shipping_max_failures: u32,
}

fn rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err("must be between 0 and 1".into())
    }
}

// As the orchestrator: see its `main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let participant = shipping::participant(shipping::FailureInjection {
        rate: args.shipping_failure_rate,
        max_failures: args.shipping_max_failures,
    });
    saga_examples::cli::main(Service::Shipping, &args.common, participant)
}
