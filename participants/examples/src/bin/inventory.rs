//! The `inventory` participant: reserves and releases stock.

use clap::Parser;
use saga_examples::{books::Service, cli::CommonArgs, inventory};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The inventory participant of the order-checkout saga"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Units of every SKU the first time it is seen.
    #[arg(long, env = "INITIAL_STOCK", default_value_t = inventory::DEFAULT_INITIAL_STOCK,
          value_parser = clap::value_parser!(i64).range(0..))]
    initial_stock: i64,
}

// As the orchestrator: see its `main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let participant = inventory::participant(args.initial_stock);
    saga_examples::cli::main(Service::Inventory, &args.common, participant)
}
