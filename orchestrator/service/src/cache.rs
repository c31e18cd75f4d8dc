//! The states this process last committed, by saga: deciding on a reply then needs no read of
//! the snapshot, nor its parse.
//!
//! A cached state is stale only when another process (a second orchestrator on the database,
//! an operator's command line) advanced the saga since. Nothing decided on a stale state gets
//! through: a decision that records events collides with the ones recorded at the same
//! `(saga_id, seq)` and is decided again on the stored state, and the runtime decides again on
//! the stored state any input that a cached state would leave without an event (an ignored
//! reply, a timer no longer due), since a fresher state might take it.

use std::collections::HashMap;
use std::sync::Mutex;

use saga_engine::SagaState;
use uuid::Uuid;

/// States kept at most. Sagas in flight fit many times over at the usual concurrency; under a
/// backlog of more the cache starts over when full, and memory stays flat.
const LIMIT: usize = 8192;

#[derive(Default)]
pub(crate) struct StateCache {
    states: Mutex<HashMap<Uuid, SagaState>>,
}

impl StateCache {
    /// Takes the cached states of `ids` out: whoever decides on one puts back what it commits.
    pub(crate) fn take(&self, ids: &[Uuid]) -> HashMap<Uuid, SagaState> {
        let mut states = self.lock();
        ids.iter()
            .filter_map(|id| states.remove(id).map(|state| (*id, state)))
            .collect()
    }

    /// Keeps `state` as committed; a settled saga is forgotten, since nothing more is decided
    /// on it but what an operator asks.
    pub(crate) fn put(&self, state: SagaState) {
        let mut states = self.lock();
        if state.status.is_settled() {
            states.remove(&state.saga_id);
            return;
        }
        if states.len() >= LIMIT && !states.contains_key(&state.saga_id) {
            states.clear();
        }
        match states.get(&state.saga_id) {
            // A commit that finished later on an earlier version: keep the newer.
            Some(kept) if kept.version > state.version => {}
            _ => {
                states.insert(state.saga_id, state);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, SagaState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }
}
