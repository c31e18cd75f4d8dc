//! The saga engine: definitions, state and decisions as plain functions over data.
//!
//! Nothing here performs IO or reads the clock; time comes in as a value. The runtime
//! (`orchestrator`) loads state, calls [`engine::decide`], and commits what it returns.

pub mod check;
pub mod definition;
pub mod engine;
pub mod graph;
pub mod state;

pub use definition::{Definitions, SagaDefinition, StepDefinition, StepKind};
pub use engine::{
    Decision, Ignored, Input, OperatorCommand, Outcome, Rejection, TimerChange, TimerKind, decide,
};
pub use state::SagaState;
