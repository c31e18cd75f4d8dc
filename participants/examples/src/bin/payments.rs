//! The `payments` participant: charges (and refunds) payments.

use clap::Parser;
use saga_examples::{books::Service, cli::CommonArgs, payments};

#[derive(Debug, Parser)]
#[command(version, about = "The payments participant of the order-checkout saga")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Charges above this many cents are declined (a business failure).
    #[arg(long, env = "PAYMENT_LIMIT", default_value_t = payments::DEFAULT_PAYMENT_LIMIT)]
    payment_limit: i64,
}

// As the orchestrator: see its `main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let participant = payments::participant(args.payment_limit);
    saga_examples::cli::main(Service::Payments, &args.common, participant)
}
