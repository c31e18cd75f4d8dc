//! One module per subcommand.

pub mod check;
pub mod definitions;
pub mod graph;
pub mod openapi;
pub mod rebuild;
pub mod run;
pub mod validate;
