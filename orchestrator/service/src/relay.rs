//! The outbox relay: publishes committed outbox rows with publisher confirms, many in flight
//! at once, and marks them sent. A crash between publish and mark re-sends them: receivers
//! de-duplicate by message id.
//!
//! The rows this process commits reach the relay in memory, through the [`Handoff`], the
//! moment they are committed: no query stands between a decision and its publication, and the
//! marks ride on the next group commit instead of a transaction of their own. The database is
//! read only for what the handoff cannot carry: rows left from before a restart, rows another
//! process wrote (an operator's command line), rows whose publication failed, and rows past
//! the handoff's limit while the relay is behind or the broker away.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use saga_amqp::{AmqpError, OutgoingMessage, Publisher};
use saga_schemas::amqp::{COMMANDS_EXCHANGE, HeaderValue, header, message_type};
use saga_schemas::limits;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::runtime::Runtime;
use crate::store::OutboxRow;

/// Rows per round trip: enough to share one confirm wait among many messages.
const BATCH: u64 = 256;
/// How often to look in the database for rows the handoff did not bring.
const POLL: Duration = Duration::from_millis(500);
/// Rows younger than this are left to the handoff by the periodic look at the database: one of
/// this process's is on its way in memory, and another orchestrator's on its own relay's way.
const POLL_MIN_AGE: Duration = Duration::from_secs(1);
/// Rows the handoff holds at most. Past it the relay is behind (or the broker away): the handoff
/// drops what it holds and takes nothing more, and the relay reads the rows from the database
/// (where they are anyway) until it has caught up. Keeps memory flat under any backlog.
const HANDOFF_LIMIT: usize = 16_384;
/// Sent rows are kept this long (to inspect what went out), then deleted. A prune reads only
/// the rows at or below the outbox's last id as read this long ago.
const KEEP_SENT: Duration = Duration::from_secs(600);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The participants whose commands go packed, several to a message
/// ([`saga_schemas::StepCommands`]); the others get one message per command. A participant
/// built on this project's SDK takes both; one written against the single-command contract
/// alone must not be named. Parsed from `none` (the default), `all`, or a comma-separated list
/// of participant names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PackCommands {
    #[default]
    None,
    All,
    Only(BTreeSet<String>),
}

impl PackCommands {
    fn packs(&self, participant: &str) -> bool {
        match self {
            PackCommands::None => false,
            PackCommands::All => true,
            PackCommands::Only(names) => names.contains(participant),
        }
    }
}

impl std::str::FromStr for PackCommands {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "" | "none" => return Ok(PackCommands::None),
            "all" => return Ok(PackCommands::All),
            _ => {}
        }
        let mut names = BTreeSet::new();
        for name in text.split(',').map(str::trim) {
            if !saga_schemas::definition::is_participant_name(name) {
                return Err(format!(
                    "{name:?} is not a participant name (letters, digits, `.`, `_` and `-`): \
                     give `none`, `all` or participant names separated by commas"
                ));
            }
            names.insert(name.to_owned());
        }
        Ok(PackCommands::Only(names))
    }
}

impl std::fmt::Display for PackCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PackCommands::None => f.write_str("none"),
            PackCommands::All => f.write_str("all"),
            PackCommands::Only(names) => {
                f.write_str(&names.iter().cloned().collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// Packed messages published (and confirmed), by participant.
pub const PACKS: &str = "saga_command_packs_total";
/// Commands published in packed messages, by participant.
pub const PACKED_COMMANDS: &str = "saga_commands_packed_total";

/// Commands in one packed message at most: a poison command (one whose participant crashes on
/// it) takes no more than these to its dead-letter queue at the delivery limit.
const MAX_PACK: usize = 32;
/// Bytes of a packed body at most, below the message limit by room for the packing itself.
const MAX_PACK_BYTES: usize = limits::MAX_MESSAGE_BYTES - 4096;
/// Bytes a command takes in a pack besides its body, at most: its wrapping and trace context.
const PACKED_OVERHEAD: usize = 256;

/// Messages to publish for `messages`, with the indices in `messages` that each carries: the
/// commands for a participant that `pack` names go together, up to [`MAX_PACK`] and
/// [`MAX_PACK_BYTES`] a message, each pack where its first command was.
fn pack(messages: &[OutgoingMessage], pack: &PackCommands) -> Vec<(OutgoingMessage, Vec<usize>)> {
    // Per (participant, reply_to): the packs being filled, as indices into `out`.
    let mut open: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    let mut out: Vec<(Vec<usize>, usize)> = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let packable = message.message_type == message_type::STEP_COMMAND
            && message.exchange == COMMANDS_EXCHANGE
            && pack.packs(&message.routing_key)
            && message.body.len() < MAX_PACK_BYTES;
        if !packable {
            out.push((vec![i], 0));
            continue;
        }
        let key = (message.routing_key.as_str(), message.reply_to.as_deref());
        match open.get(&key).copied() {
            Some(at)
                if out[at].0.len() < MAX_PACK
                    && out[at].1 + message.body.len() + PACKED_OVERHEAD <= MAX_PACK_BYTES =>
            {
                out[at].0.push(i);
                out[at].1 += message.body.len() + PACKED_OVERHEAD;
            }
            _ => {
                open.insert(key, out.len());
                out.push((vec![i], message.body.len() + PACKED_OVERHEAD));
            }
        }
    }
    out.into_iter()
        .map(|(members, _)| {
            let message = match members.as_slice() {
                [one] => messages[*one].clone(),
                many => OutgoingMessage::packed_commands(
                    &many.iter().map(|&i| &messages[i]).collect::<Vec<_>>(),
                ),
            };
            (message, members)
        })
        .collect()
}

/// Outbox rows committed by this process, on their way to the relay.
#[derive(Default)]
pub struct Handoff {
    state: Mutex<Handed>,
    wake: Notify,
}

#[derive(Default)]
struct Handed {
    rows: Vec<OutboxRow>,
    /// Rows were dropped at the limit: nothing more is taken until the relay, having read the
    /// database up to date, resumes.
    missed: bool,
}

impl Handoff {
    pub(crate) fn push(&self, rows: impl IntoIterator<Item = OutboxRow>) {
        {
            let mut handed = self.lock();
            if handed.missed {
                return;
            }
            handed.rows.extend(rows);
            if handed.rows.len() > HANDOFF_LIMIT {
                handed.rows = Vec::new();
                handed.missed = true;
            }
        }
        self.wake.notify_one();
    }

    /// The rows handed so far, and whether rows are being dropped.
    fn take(&self) -> (Vec<OutboxRow>, bool) {
        let mut handed = self.lock();
        let missed = handed.missed;
        (std::mem::take(&mut handed.rows), missed)
    }

    /// Takes rows again, once the relay has read the database up to date.
    fn resume(&self) {
        self.lock().missed = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handed> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs until `shutdown`; returns an error when the broker connection is lost.
pub async fn run(
    runtime: Runtime,
    publisher: Publisher,
    pack: PackCommands,
    shutdown: CancellationToken,
) -> Result<(), AmqpError> {
    let mut relay = Relay {
        runtime,
        publisher,
        pack,
        unmarked: HashSet::new(),
        marking: VecDeque::new(),
        read_back: Recent::default(),
        last_ids: VecDeque::new(),
        failures: 0,
    };
    let mut last_prune: Option<Instant> = None;
    // At the start, whatever is unsent, however young: rows left from before.
    let mut read_all = true;
    let mut next_poll = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            relay.prune().await;
        }
        relay.settle_marks();
        let (rows, missed) = relay.runtime.handoff().take();
        read_all |= missed;
        if !rows.is_empty() {
            read_all |= !relay.publish_handed(rows, &shutdown).await?;
            continue;
        }
        if read_all || Instant::now() >= next_poll {
            let created_before = (!read_all).then(|| Utc::now() - POLL_MIN_AGE);
            match relay.publish_stored(created_before, &shutdown).await? {
                // More may wait: read on.
                Some(true) => read_all = true,
                // Caught up after the handoff dropped rows: take rows from it again, and read
                // once more for those committed between that read and now.
                Some(false) if missed => relay.runtime.handoff().resume(),
                Some(false) => {
                    read_all = false;
                    next_poll = Instant::now() + POLL;
                }
                None => {}
            }
            continue;
        }
        tokio::select! {
            _ = relay.runtime.handoff().wake.notified() => {}
            _ = tokio::time::sleep_until(next_poll.into()) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

struct Relay {
    runtime: Runtime,
    publisher: Publisher,
    pack: PackCommands,
    /// Rows published from the handoff whose marks are not committed yet: the database still
    /// shows them unsent, and must not have them published again.
    unmarked: HashSet<i64>,
    /// Marks on their way through the group commit, oldest first.
    marking: VecDeque<(oneshot::Receiver<()>, Vec<i64>)>,
    /// Rows lately published from a read of the database: one committed here just before that
    /// read may still come through the handoff.
    read_back: Recent,
    /// The outbox's last id as read at each prune, oldest first.
    last_ids: VecDeque<(Instant, i64)>,
    failures: u32,
}

/// Ids remembered for [`Recent::KEEP`].
#[derive(Default)]
struct Recent {
    ids: HashSet<i64>,
    order: VecDeque<(Instant, i64)>,
}

impl Recent {
    /// Far longer than a row takes from its commit to the relay's next look at the handoff.
    const KEEP: Duration = Duration::from_secs(10);

    fn insert(&mut self, id: i64) {
        self.forget_old();
        if self.ids.insert(id) {
            self.order.push_back((Instant::now(), id));
        }
    }

    fn contains(&mut self, id: i64) -> bool {
        self.forget_old();
        self.ids.contains(&id)
    }

    fn forget_old(&mut self) {
        while let Some(&(at, old)) = self.order.front() {
            if at.elapsed() < Self::KEEP {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&old);
        }
    }
}

impl Relay {
    async fn prune(&mut self) {
        let store = self.runtime.store();
        match store.outbox_last_id().await {
            Ok(id) => self.last_ids.push_back((Instant::now(), id)),
            Err(error) => warn!(%error, "cannot read the outbox's last id"),
        }
        // The newest reading at least KEEP_SENT old bounds this prune.
        while self
            .last_ids
            .get(1)
            .is_some_and(|(at, _)| at.elapsed() >= KEEP_SENT)
        {
            self.last_ids.pop_front();
        }
        let Some(&(at, up_to)) = self.last_ids.front() else {
            return;
        };
        if at.elapsed() < KEEP_SENT {
            return;
        }
        let before = Utc::now() - KEEP_SENT;
        match store.prune_outbox(before, up_to).await {
            Ok(0) => {}
            Ok(pruned) => debug!(pruned, "deleted old sent outbox rows"),
            Err(error) => warn!(%error, "cannot prune the outbox"),
        }
    }

    /// Forgets the rows whose marks are committed (or will never be, the worker having stopped:
    /// a later read of the database publishes them again, at least once as ever).
    fn settle_marks(&mut self) {
        while let Some((answer, _)) = self.marking.front_mut() {
            if matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                break;
            }
            let (_, ids) = self.marking.pop_front().expect("the front just seen");
            for id in ids {
                self.unmarked.remove(&id);
            }
        }
    }

    /// Publishes rows from the handoff and has them marked in the next group commit. Returns
    /// whether every one went out (those that did not stay unsent in the database).
    async fn publish_handed(
        &mut self,
        rows: Vec<OutboxRow>,
        shutdown: &CancellationToken,
    ) -> Result<bool, AmqpError> {
        // Already published from a read of the database that raced with the handoff.
        let rows: Vec<OutboxRow> = rows
            .into_iter()
            .filter(|row| !self.unmarked.contains(&row.id) && !self.read_back.contains(row.id))
            .collect();
        let (sent, all_sent) = self.publish(&rows).await;
        if !sent.is_empty() {
            self.unmarked.extend(&sent);
            let answer = self.runtime.mark_sent(sent.clone());
            self.marking.push_back((answer, sent));
        }
        self.after_publish(all_sent, shutdown).await?;
        Ok(all_sent)
    }

    /// Publishes a batch read from the database and marks it sent there. Returns whether the
    /// batch was full (`None` when the database could not be read).
    async fn publish_stored(
        &mut self,
        created_before: Option<DateTime<Utc>>,
        shutdown: &CancellationToken,
    ) -> Result<Option<bool>, AmqpError> {
        let excluding: Vec<i64> = self.unmarked.iter().copied().collect();
        let batch = match self
            .runtime
            .store()
            .outbox_batch_where(BATCH, &excluding, created_before)
            .await
        {
            Ok(batch) => batch,
            Err(error) => {
                warn!(%error, "cannot read the outbox; retrying");
                pause(shutdown, Duration::from_secs(1)).await;
                return Ok(None);
            }
        };
        let full = batch.rows.len() as u64 >= BATCH;
        if batch.rows.is_empty() {
            drop(batch);
            return Ok(Some(false));
        }
        let (sent, all_sent) = self.publish(&batch.rows).await;
        for id in &sent {
            self.read_back.insert(*id);
        }
        if let Err(error) = batch.mark_sent(&sent).await {
            warn!(%error, "cannot mark outbox rows sent; they will be sent again");
        }
        self.after_publish(all_sent, shutdown).await?;
        Ok(Some(full))
    }

    /// Publishes `rows` but the superseded ones; returns the ids to mark sent (the confirmed
    /// and the superseded) and whether that is all of them.
    async fn publish(&self, rows: &[OutboxRow]) -> (Vec<i64>, bool) {
        // An earlier attempt of a step that a later row of the batch asks again (after a broker
        // outage, say) would only add to the queue of a participant that is behind.
        let now = Utc::now();
        let superseded_ids = superseded(rows);
        let (superseded, live): (Vec<_>, Vec<_>) = rows
            .iter()
            .partition(|row| superseded_ids.contains(&row.id));
        let mut sent: Vec<i64> = Vec::with_capacity(rows.len());
        for row in &superseded {
            debug!(saga_id = %row.saga_id, message_id = %row.message.message_id, routing_key = %row.message.routing_key,
                "superseded by a later attempt in the outbox: not published");
            sent.push(row.id);
        }
        let messages: Vec<_> = live.iter().map(|row| lifetime_from(row, now)).collect();
        let (messages, members): (Vec<_>, Vec<_>) = pack(&messages, &self.pack).into_iter().unzip();
        let results = self.publisher.publish_all(&messages).await;
        for ((message, members), result) in messages.iter().zip(members).zip(results) {
            if result.is_ok() && message.message_type == message_type::STEP_COMMANDS {
                let participant = message.routing_key.clone();
                metrics::counter!(PACKS, "participant" => participant.clone()).increment(1);
                metrics::counter!(PACKED_COMMANDS, "participant" => participant)
                    .increment(members.len() as u64);
            }
            for row in members.into_iter().map(|i| live[i]) {
                match &result {
                    Ok(()) => sent.push(row.id),
                    Err(error) => {
                        warn!(saga_id = %row.saga_id, message_id = %row.message.message_id, routing_key = %row.message.routing_key, %error,
                            "publish not confirmed; it stays in the outbox");
                    }
                }
            }
        }
        debug!(
            sent = sent.len() - superseded.len(),
            superseded = superseded.len(),
            of = rows.len(),
            "relayed outbox rows"
        );
        let all_sent = sent.len() == rows.len();
        (sent, all_sent)
    }

    /// Ends the relay when its channel closed; backs off after a failure.
    async fn after_publish(
        &mut self,
        all_sent: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), AmqpError> {
        if !self.publisher.is_open() {
            return Err(AmqpError::ConnectionLost(
                "the relay's channel closed".into(),
            ));
        }
        if all_sent {
            self.failures = 0;
        } else {
            self.failures = (self.failures + 1).min(6);
            pause(shutdown, Duration::from_millis(100 << self.failures)).await;
        }
        Ok(())
    }
}

/// Ids of the command rows for which `rows` also holds a later attempt of the same step in the
/// same direction of the same saga.
fn superseded(rows: &[OutboxRow]) -> HashSet<i64> {
    let mut latest: HashMap<(uuid::Uuid, &str, &str), (i64, i64)> = HashMap::new();
    let mut superseded = HashSet::new();
    for row in rows {
        let Some((step, direction, attempt)) = command_key(&row.message) else {
            continue;
        };
        match latest.entry((row.saga_id, step, direction)) {
            Entry::Vacant(slot) => {
                slot.insert((attempt, row.id));
            }
            Entry::Occupied(mut slot) => {
                let (best, best_id) = *slot.get();
                if attempt > best {
                    superseded.insert(best_id);
                    slot.insert((attempt, row.id));
                } else {
                    superseded.insert(row.id);
                }
            }
        }
    }
    superseded
}

/// Step, direction and attempt of a command, from its headers.
fn command_key(message: &OutgoingMessage) -> Option<(&str, &str, i64)> {
    if message.message_type != message_type::STEP_COMMAND {
        return None;
    }
    let find = |key: &str| {
        message
            .headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    };
    match (
        find(header::STEP)?,
        find(header::DIRECTION)?,
        find(header::ATTEMPT)?,
    ) {
        (HeaderValue::Str(step), HeaderValue::Str(direction), HeaderValue::Int(attempt)) => {
            Some((step.as_str(), direction.as_str(), *attempt))
        }
        _ => None,
    }
}

/// The row's message with its lifetime in the queue counted from now, its publication: a
/// command that waited in the outbox (a broker outage, a busy relay) still gets the whole
/// lifetime its decision gave it, so a late relay never starves a participant of commands.
fn lifetime_from(row: &OutboxRow, now: DateTime<Utc>) -> OutgoingMessage {
    let mut message = row.message.clone();
    if let Some(at) = message.discard_after {
        message.discard_after = Some(now + (at - row.created_at).max(chrono::Duration::zero()));
    }
    message
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use saga_schemas::{Direction, StepCommand};

    use super::*;

    fn row(id: i64, saga: u128, step: &str, direction: Direction, attempt: u32) -> OutboxRow {
        let saga_id = uuid::Uuid::from_u128(saga);
        let command = StepCommand {
            message_id: uuid::Uuid::new_v4(),
            saga_id,
            saga_name: "order".into(),
            step: step.into(),
            direction,
            action: "act".into(),
            attempt,
            data: Default::default(),
            action_output: None,
            expires_at: None,
        };
        let created_at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        OutboxRow {
            id,
            saga_id,
            message: OutgoingMessage::command(
                &command,
                "p",
                "saga.replies",
                Some(created_at + chrono::Duration::seconds(20)),
            ),
            created_at,
        }
    }

    #[test]
    fn only_a_later_attempt_of_the_same_step_and_direction_supersedes() {
        let rows = [
            row(1, 1, "charge", Direction::Execute, 1),
            row(2, 1, "charge", Direction::Execute, 3),
            row(3, 1, "charge", Direction::Execute, 2),
            row(4, 1, "charge", Direction::Compensate, 1),
            row(5, 2, "charge", Direction::Execute, 1),
            row(6, 1, "reserve", Direction::Execute, 1),
        ];
        assert_eq!(superseded(&rows), HashSet::from([1, 3]));
    }

    #[test]
    fn past_its_limit_the_handoff_drops_its_rows_and_takes_none_until_resumed() {
        let handoff = Handoff::default();
        handoff.push((0..3).map(|i| row(i, 1, "charge", Direction::Execute, 1)));
        let (rows, missed) = handoff.take();
        assert_eq!((rows.len(), missed), (3, false));

        let many = HANDOFF_LIMIT as i64 + 1;
        handoff.push((0..many).map(|i| row(i, 1, "charge", Direction::Execute, 1)));
        handoff.push([row(many, 1, "charge", Direction::Execute, 1)]);
        let (rows, missed) = handoff.take();
        assert_eq!(
            (rows.len(), missed),
            (0, true),
            "read from the database instead"
        );
        let (_, missed) = handoff.take();
        assert!(missed, "until the relay has caught up");

        handoff.resume();
        handoff.push([row(many + 1, 1, "charge", Direction::Execute, 1)]);
        let (rows, missed) = handoff.take();
        assert_eq!((rows.len(), missed), (1, false));
    }

    #[test]
    fn packs_hold_one_participant_s_commands_up_to_the_limit_and_nothing_else() {
        let rows: Vec<OutboxRow> = (0..MAX_PACK as i64 + 3)
            .map(|i| row(i, i as u128, "charge", Direction::Execute, 1))
            .collect();
        let mut messages: Vec<OutgoingMessage> = rows.iter().map(|r| r.message.clone()).collect();
        let mut other = messages[0].clone();
        other.routing_key = "inventory".into();
        messages.insert(1, other);
        let event = saga_schemas::EventEnvelope {
            saga_id: uuid::Uuid::from_u128(1),
            saga_name: "order".into(),
            seq: 1,
            recorded_at: Utc::now(),
            event: saga_schemas::SagaEvent::SagaCompleted,
        };
        messages.insert(2, OutgoingMessage::event(&event, uuid::Uuid::new_v4()));

        let only_p: PackCommands = "p".parse().unwrap();
        let packed = pack(&messages, &only_p);
        let kinds: Vec<(&str, usize)> = packed
            .iter()
            .map(|(m, members)| (m.message_type.as_str(), members.len()))
            .collect();
        assert_eq!(
            kinds,
            [
                (message_type::STEP_COMMANDS, MAX_PACK),
                (message_type::STEP_COMMAND, 1),
                (message_type::EVENT, 1),
                (message_type::STEP_COMMANDS, 3),
            ]
        );
        let members: Vec<usize> = packed.iter().flat_map(|(_, m)| m.clone()).collect();
        let mut sorted = members.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..messages.len()).collect::<Vec<_>>(), "each once");
        assert_eq!(packed[1].0, messages[1], "another participant's goes alone");

        let none = pack(&messages, &PackCommands::None);
        assert_eq!(none.len(), messages.len());
        assert!(none.iter().all(|(m, members)| *m == messages[members[0]]));
    }

    #[test]
    fn a_pack_stays_within_the_message_limit() {
        let mut big = row(1, 1, "charge", Direction::Execute, 1).message;
        big.body = format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_PACK_BYTES - 300));
        let small = row(2, 2, "charge", Direction::Execute, 1).message;
        let packed = pack(&[big.clone(), small.clone()], &PackCommands::All);
        assert_eq!(
            packed.len(),
            2,
            "the two would pass the size limit together"
        );
        assert_eq!(packed[0].0, big);
        assert_eq!(packed[1].0, small);
        let packed = pack(
            &[big.clone(), small.clone(), small.clone()],
            &PackCommands::All,
        );
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[1].0.message_type, message_type::STEP_COMMANDS);
    }

    #[test]
    fn pack_commands_parses_none_all_and_names() {
        assert_eq!("".parse::<PackCommands>(), Ok(PackCommands::None));
        assert_eq!("none".parse::<PackCommands>(), Ok(PackCommands::None));
        assert_eq!("all".parse::<PackCommands>(), Ok(PackCommands::All));
        let names: PackCommands = "orders, payments".parse().unwrap();
        assert!(names.packs("orders") && names.packs("payments") && !names.packs("inventory"));
        assert_eq!(names.to_string(), "orders,payments");
        let error = "orders,pay ments".parse::<PackCommands>().unwrap_err();
        assert!(error.contains("\"pay ments\""), "{error}");
        assert!("orders,,payments".parse::<PackCommands>().is_err());
    }

    #[test]
    fn a_command_lives_its_whole_lifetime_from_its_publication() {
        let r = row(1, 1, "charge", Direction::Execute, 1);
        let late = r.created_at + chrono::Duration::minutes(5);
        let published = lifetime_from(&r, late);
        assert_eq!(
            published.discard_after,
            Some(late + chrono::Duration::seconds(20))
        );
    }
}
