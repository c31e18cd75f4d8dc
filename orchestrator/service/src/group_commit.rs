//! Group commit across callers: the commits that the reply consumer, the start paths (HTTP and
//! AMQP), the timers and operators hand in at about the same time share one transaction.
//!
//! On SQLite every write transaction queues for the one writer, so a start committed alone
//! kept a batch of replies waiting behind it; here they all go in the same transaction. A
//! worker takes every request waiting when it becomes free, so a batch grows with the load and
//! a lone request goes at once. If the shared transaction fails, each request is committed
//! alone, so a conflict or a duplicate is reported to the caller it belongs to, exactly as
//! without sharing.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Commit, CommitError, Store};

/// Commits per shared transaction at most: past it, statements get long for little gain.
const MAX_COMMITS: usize = 512;

/// What a caller gets back: its commits, and the number of outbox rows they wrote.
pub type Committed = (Vec<Commit>, Result<usize, CommitError>);

struct Request {
    commits: Vec<Commit>,
    done: oneshot::Sender<Committed>,
}

/// Hands commits to the group-commit worker; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    requests: mpsc::UnboundedSender<Request>,
}

impl GroupCommit {
    /// Starts the worker on `store`: one transaction at a time, taking every request waiting.
    /// It stops when the last handle is dropped.
    pub fn start(store: Store) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel::<Request>();
        tokio::spawn(work(store, receiver));
        GroupCommit { requests }
    }

    /// Commits `commits` in one transaction, possibly shared with other callers' commits.
    pub async fn commit(&self, commits: Vec<Commit>) -> Committed {
        let (done, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(request)) = self.requests.send(Request { commits, done })
        {
            return (request.commits, Err(stopped()));
        }
        answer
            .await
            .unwrap_or_else(|_| (Vec::new(), Err(stopped())))
    }
}

fn stopped() -> CommitError {
    CommitError {
        index: None,
        error: crate::store::StoreError::Db(sea_orm::DbErr::Custom(
            "the orchestrator is stopping".into(),
        )),
    }
}

async fn work(store: Store, mut receiver: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = receiver.recv().await {
        let mut commits = first.commits.len();
        let mut batch = vec![first];
        while commits < MAX_COMMITS {
            match receiver.try_recv() {
                Ok(request) => {
                    commits += request.commits.len();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        // A bug that panics fails this batch's callers (their answers are dropped, which they
        // see as an error to retry), not every commit after it.
        if AssertUnwindSafe(commit_batch(&store, batch))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!("a group commit panicked; its callers are told it failed");
        }
    }
}

async fn commit_batch(store: &Store, mut batch: Vec<Request>) {
    if batch.len() > 1 {
        let sizes: Vec<usize> = batch.iter().map(|r| r.commits.len()).collect();
        let all: Vec<Commit> = batch
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.commits))
            .collect();
        let shared = store.commit(&all).await;
        let mut all = all.into_iter();
        for (request, size) in batch.iter_mut().zip(sizes) {
            request.commits = all.by_ref().take(size).collect();
        }
        if shared.is_ok() {
            for request in batch {
                let rows = request.commits.iter().map(|c| c.outbox.len()).sum();
                let _ = request.done.send((request.commits, Ok(rows)));
            }
            return;
        }
        // Nothing was written: each request alone, so each gets its own answer.
    }
    for request in batch {
        let result = store.commit(&request.commits).await;
        let _ = request.done.send((request.commits, result));
    }
}
