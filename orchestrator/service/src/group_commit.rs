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
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Commit, CommitError, Store};

/// Commits per shared transaction at most: past it, statements get long for little gain.
const MAX_COMMITS: usize = 512;
/// How long outbox rows marked sent wait for a transaction to ride on before they are
/// committed alone: under load one always comes sooner; when idle nobody waits on them.
const MARKS_WAIT: Duration = Duration::from_millis(20);

/// What a caller gets back: its commits, and the ids of the outbox rows they wrote, in the
/// order of their messages.
pub type Committed = (Vec<Commit>, Result<Vec<i64>, CommitError>);

enum Request {
    Commit {
        commits: Vec<Commit>,
        done: oneshot::Sender<Committed>,
    },
    /// Outbox rows published and confirmed: `done` is answered once the mark is committed.
    Sent {
        ids: Vec<i64>,
        done: oneshot::Sender<()>,
    },
}

/// Outbox rows waiting for a transaction to be marked sent in.
#[derive(Default)]
struct Marks {
    ids: Vec<i64>,
    done: Vec<oneshot::Sender<()>>,
}

impl Marks {
    fn add(&mut self, ids: Vec<i64>, done: oneshot::Sender<()>) {
        self.ids.extend(ids);
        self.done.push(done);
    }

    fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    fn committed(&mut self) {
        self.ids.clear();
        for done in self.done.drain(..) {
            let _ = done.send(());
        }
    }
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
        if let Err(mpsc::error::SendError(request)) =
            self.requests.send(Request::Commit { commits, done })
        {
            let Request::Commit { commits, .. } = request else {
                unreachable!("the request just sent")
            };
            return (commits, Err(stopped()));
        }
        answer
            .await
            .unwrap_or_else(|_| (Vec::new(), Err(stopped())))
    }

    /// Marks outbox rows `ids` sent in the next transaction (or alone, soon, if none comes).
    /// The answer comes once that is committed; a mark that fails is tried again with the next
    /// transaction, and a dropped sender means the worker stopped first.
    pub fn mark_sent(&self, ids: Vec<i64>) -> oneshot::Receiver<()> {
        let (done, answer) = oneshot::channel();
        let _ = self.requests.send(Request::Sent { ids, done });
        answer
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
    let mut marks = Marks::default();
    loop {
        let first = if marks.is_empty() {
            receiver.recv().await
        } else {
            tokio::select! {
                request = receiver.recv() => request,
                () = tokio::time::sleep(MARKS_WAIT) => {
                    commit_marks(&store, &mut marks).await;
                    continue;
                }
            }
        };
        let Some(first) = first else {
            commit_marks(&store, &mut marks).await;
            return;
        };
        let mut batch = Vec::new();
        let mut commits = 0;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Commit { commits: c, done } => {
                    commits += c.len();
                    batch.push((c, done));
                }
                Request::Sent { ids, done } => marks.add(ids, done),
            }
            if commits < MAX_COMMITS {
                next = receiver.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        // A bug that panics fails this batch's callers (their answers are dropped, which they
        // see as an error to retry), not every commit after it.
        if AssertUnwindSafe(commit_batch(&store, batch, &mut marks))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!("a group commit panicked; its callers are told it failed");
        }
    }
}

/// The marks alone; kept for the next transaction if this one fails.
async fn commit_marks(store: &Store, marks: &mut Marks) {
    match store.commit_marking_sent(&[], &marks.ids).await {
        Ok(_) => marks.committed(),
        Err(error) => {
            tracing::warn!(%error, "cannot mark outbox rows sent; trying again in a second");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

type Batch = Vec<(Vec<Commit>, oneshot::Sender<Committed>)>;

async fn commit_batch(store: &Store, mut batch: Batch, marks: &mut Marks) {
    let sizes: Vec<usize> = batch.iter().map(|(c, _)| c.len()).collect();
    let all: Vec<Commit> = batch
        .iter_mut()
        .flat_map(|(c, _)| std::mem::take(c))
        .collect();
    let shared = store.commit_marking_sent(&all, &marks.ids).await;
    let mut all = all.into_iter();
    for ((commits, _), size) in batch.iter_mut().zip(sizes) {
        *commits = all.by_ref().take(size).collect();
    }
    match shared {
        Ok(ids) => {
            marks.committed();
            let mut ids = ids.into_iter();
            for (commits, done) in batch {
                let rows = commits.iter().map(|c| c.outbox.len()).sum();
                let mine = ids.by_ref().take(rows).collect();
                let _ = done.send((commits, Ok(mine)));
            }
        }
        // Its own failure: the answer as it is.
        Err(error) if batch.len() == 1 && marks.is_empty() => {
            let (commits, done) = batch.pop().expect("one request");
            let _ = done.send((commits, Err(error)));
        }
        // Nothing was written: each request alone, so each gets its own answer; the marks
        // wait for the next transaction.
        Err(_) => {
            for (commits, done) in batch {
                let result = store.commit(&commits).await;
                let _ = done.send((commits, result));
            }
        }
    }
}
