//! The `orders` participant: creates, cancels and approves orders.

use clap::Parser;
use saga_examples::{books::Service, cli::CommonArgs, orders};

#[derive(Debug, Parser)]
#[command(version, about = "The orders participant of the order-checkout saga")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

// As the orchestrator: see its `main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    saga_examples::cli::main(Service::Orders, &args.common, orders::participant())
}
