//! Ack coalescing: the settlement frames of one consumer channel.
//!
//! Completed deliveries are acked together, with `multiple = true` over the contiguous
//! completed prefix of the channel's delivery tags (every tag below the lowest one a
//! handler still holds). A `complete` waits until the ack covering its delivery was
//! written to the channel, at most [`ACK_FLUSH_INTERVAL`] plus the write:
//!
//! - the prefix is written at once when it reaches the batch size, or when no tracked
//!   delivery is still held (nothing else could join it: a lone message pays no delay);
//! - when no other completion followed within [`ACK_QUIET`], the prefix is written
//!   (completions have stopped coming, or come one at a time), and from then on each
//!   completion is written at once, until one comes while another waits unwritten;
//! - otherwise each completion waits at most [`ACK_FLUSH_INTERVAL`]; then the prefix is
//!   written, and completed deliveries beyond it, held back by a slower one, are acked
//!   one by one;
//! - before any nack (a requeue) every completed delivery is acked first, and
//!   [`Acks::flush`] (at `stop_receiving`) does the same.
//!
//! Every tag is settled exactly once: frames are planned and written under one writer
//! lock, so a multiple ack never overtakes (and so never covers) a tag that is acked or
//! nacked on its own, and covers only tags that are completed or already settled. Tags
//! belong to the channel they were delivered on: a source has one channel, and a
//! reconnect is a new source with a new [`Acks`]. When the channel closes before the
//! ack was written, the write fails and the completion is a lost lock; an ack that was
//! written but did not reach the broker before the connection dropped only means the
//! message is delivered again (at least once, as before coalescing).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::warn;

/// How long a completed delivery waits at most for others to be acked with it.
pub(crate) const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(5);

/// How long a channel stays without a new completion before the completed prefix is
/// written anyway: nothing more is coming soon (say, a session's next message waits for
/// this one).
pub(crate) const ACK_QUIET: Duration = Duration::from_millis(1);

/// The largest number of completions acked by one frame before it is written at once.
pub(crate) const MAX_ACK_BATCH: usize = 64;

/// The result of writing a settlement frame to the channel.
pub(crate) type Written = Result<(), lapin::Error>;

/// The ack state of one consumer channel.
pub(crate) struct Acks {
    channel: Channel,
    tags: Mutex<Tags>,
    /// Held while settlement frames are planned and written, so they reach the channel
    /// in the order they were planned.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// The prefix length that is written at once.
    batch: usize,
}

/// A tracked delivery tag that is not yet settled.
enum Entry {
    /// Handed out (or buffered) and not yet settled.
    Held,
    /// Completed; its ack is not yet written. `waiter` hears when it is.
    Done { at: Instant, waiter: oneshot::Sender<Written> },
}

/// The delivery tags of the channel not yet settled, lowest first.
#[derive(Default)]
struct Tags {
    entries: BTreeMap<u64, Entry>,
    /// The lowest held tag; the completed entries below it form the prefix.
    first_held: Option<u64>,
    /// Completed entries below `first_held` (all of them when nothing is held).
    prefix: usize,
    /// The tag expected next from the consumer.
    next: Option<u64>,
    /// When the latest completion came.
    last_done: Option<Instant>,
    /// Completions come one at a time (the channel went quiet after the last one, and
    /// none came while another waited): each is written at once, as a batch would not
    /// grow anyway (a session's next message, say, waits for this one).
    sparse: bool,
    /// A tag came out of order: multiple acks could cover a tag never seen, so every
    /// ack is single from then on.
    single: bool,
}

/// What one write settles.
#[derive(Default)]
struct Plan {
    /// A multiple ack up to this tag, and the completions it covers.
    multiple: Option<(u64, Vec<oneshot::Sender<Written>>)>,
    /// Single acks.
    singles: Vec<(u64, oneshot::Sender<Written>)>,
    /// Single nacks with requeue (they answer their caller through the write's result).
    requeues: Vec<u64>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.multiple.is_none() && self.singles.is_empty() && self.requeues.is_empty()
    }
}

/// Which completed deliveries outside the prefix a flush acks one by one.
#[derive(Clone, Copy)]
enum Stragglers {
    None,
    /// Those completed at least [`ACK_FLUSH_INTERVAL`] before this instant.
    WaitedUntil(Instant),
    All,
}

impl Tags {
    fn track(&mut self, tag: u64) {
        if self.next.is_some_and(|next| next != tag) && !self.single {
            warn!(tag, expected = ?self.next, "delivery tag out of order; acking one by one from now on");
            self.single = true;
        }
        self.next = tag.checked_add(1);
        self.entries.insert(tag, Entry::Held);
        if self.first_held.is_none() {
            self.first_held = Some(tag);
        }
    }

    /// Moves `first_held` past entries no longer held, counting the completed ones
    /// into the prefix.
    fn advance(&mut self) {
        let Some(start) = self.first_held else { return };
        let mut counted = 0;
        let mut next_held = None;
        for (&tag, entry) in self.entries.range(start..) {
            match entry {
                Entry::Held => {
                    next_held = Some(tag);
                    break;
                }
                Entry::Done { .. } => counted += 1,
            }
        }
        self.prefix += counted;
        self.first_held = next_held;
    }

    /// Marks a held tag completed; `None` when it is not held.
    fn complete(&mut self, tag: u64, at: Instant) -> Option<oneshot::Receiver<Written>> {
        let entry = self.entries.get_mut(&tag)?;
        if !matches!(entry, Entry::Held) {
            return None;
        }
        let (waiter, written) = oneshot::channel();
        *entry = Entry::Done { at, waiter };
        self.last_done = Some(self.last_done.map_or(at, |last| last.max(at)));
        if self.first_held == Some(tag) {
            self.advance();
        }
        Some(written)
    }

    /// Stops tracking a held tag (it is nacked, or its channel is gone).
    fn release(&mut self, tag: u64) {
        if matches!(self.entries.get(&tag), Some(Entry::Held)) {
            self.entries.remove(&tag);
            if self.first_held == Some(tag) {
                self.advance();
            }
        }
    }

    /// Whether completions should be written now rather than wait for more, after a
    /// completion grew the prefix from `before`: the prefix just reached `batch` (once,
    /// not again for every completion while a write is under way), or nothing is held
    /// any more.
    fn flush_due(&self, before: usize, batch: usize) -> bool {
        self.single
            || (before < batch && self.prefix >= batch)
            || (self.prefix > 0 && (self.first_held.is_none() || self.sparse))
    }

    /// Whether no completion came after one at `at`.
    fn quiet_since(&self, at: Instant) -> bool {
        self.last_done.is_none_or(|last| last <= at)
    }

    /// Takes the prefix, and the stragglers asked for, into `plan`.
    fn take(&mut self, stragglers: Stragglers, plan: &mut Plan) {
        if self.prefix > 0 {
            let prefix = match self.first_held {
                Some(held) => {
                    let rest = self.entries.split_off(&held);
                    std::mem::replace(&mut self.entries, rest)
                }
                None => std::mem::take(&mut self.entries),
            };
            self.prefix = 0;
            let done = prefix.into_iter().filter_map(|(tag, entry)| match entry {
                Entry::Done { waiter, .. } => Some((tag, waiter)),
                Entry::Held => None,
            });
            if self.single {
                plan.singles.extend(done);
            } else {
                let mut waiters = Vec::new();
                let mut upto = 0;
                for (tag, waiter) in done {
                    upto = tag;
                    waiters.push(waiter);
                }
                plan.multiple = Some((upto, waiters));
            }
        }
        let waited = |at: Instant| match stragglers {
            Stragglers::None => false,
            Stragglers::WaitedUntil(now) => at + ACK_FLUSH_INTERVAL <= now,
            Stragglers::All => true,
        };
        let due: Vec<u64> = self
            .entries
            .iter()
            .filter_map(|(&tag, entry)| match entry {
                Entry::Done { at, .. } if waited(*at) => Some(tag),
                _ => None,
            })
            .collect();
        for tag in due {
            if let Some(Entry::Done { waiter, .. }) = self.entries.remove(&tag) {
                plan.singles.push((tag, waiter));
            }
        }
    }
}

impl Acks {
    /// The ack state of a new consumer `channel` with `prefetch`.
    pub(crate) fn new(channel: Channel, prefetch: u16) -> Self {
        Self {
            channel,
            tags: Mutex::new(Tags::default()),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            batch: ack_batch(prefetch),
        }
    }

    fn tags(&self) -> MutexGuard<'_, Tags> {
        self.tags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks a delivery the consumer yielded; tags come in the order delivered.
    pub(crate) fn track(&self, tag: u64) {
        self.tags().track(tag);
    }

    /// Notes a delivery the consumer yielded that is never settled (its channel is
    /// gone already).
    pub(crate) fn skip(&self, tag: u64) {
        let mut tags = self.tags();
        tags.track(tag);
        tags.release(tag);
    }

    /// Acks a tracked delivery, coalesced with others (see the module docs); returns
    /// once the ack covering it was written to the channel.
    ///
    /// # Errors
    ///
    /// The channel's error when the ack could not be written (the channel closed);
    /// [`lapin::ErrorKind::InvalidChannelState`]-like errors for a tag not held.
    pub(crate) async fn complete(&self, tag: u64) -> Written {
        let at = Instant::now();
        let (written, due) = {
            let mut tags = self.tags();
            let before = tags.prefix;
            if before > 0 {
                // Another completion waits unwritten: they come together, so batch.
                tags.sparse = false;
            }
            let Some(written) = tags.complete(tag, at) else { return Err(self.not_held()) };
            (written, tags.flush_due(before, self.batch))
        };
        let mut written = written;
        if due {
            self.flush_with(Stragglers::None).await;
        }
        tokio::select! {
            biased;
            result = &mut written => return result.unwrap_or_else(|_| Err(self.not_held())),
            () = tokio::time::sleep_until(at + ACK_QUIET) => {}
        }
        // The latest completion writes the prefix once the channel went quiet; the
        // next ones are written at once until completions overlap again.
        let quiet = {
            let mut tags = self.tags();
            let quiet = tags.quiet_since(at);
            tags.sparse |= quiet;
            quiet
        };
        if quiet {
            self.flush_with(Stragglers::None).await;
        }
        tokio::select! {
            biased;
            result = &mut written => return result.unwrap_or_else(|_| Err(self.not_held())),
            () = tokio::time::sleep_until(at + ACK_FLUSH_INTERVAL) => {}
        }
        // Waited long enough: write the prefix, and this ack on its own if a slower
        // delivery still holds the prefix back.
        self.flush_with(Stragglers::WaitedUntil(Instant::now())).await;
        written.await.unwrap_or_else(|_| Err(self.not_held()))
    }

    /// Nacks tracked deliveries with requeue, each on its own, after acking every
    /// completed delivery. Returns one result per tag.
    pub(crate) async fn requeue(&self, requeued: &[u64]) -> Vec<Written> {
        let writing = self.writer.clone().lock_owned().await;
        let mut plan = Plan::default();
        {
            let mut tags = self.tags();
            // The prefix ends below every held tag, so the multiple ack cannot cover
            // the requeued ones.
            tags.take(Stragglers::All, &mut plan);
            for &tag in requeued {
                tags.release(tag);
            }
        }
        plan.requeues = requeued.to_vec();
        self.write(plan, writing).await
    }

    /// Acks every completed delivery now (at `stop_receiving`).
    pub(crate) async fn flush(&self) {
        self.flush_with(Stragglers::All).await;
    }

    async fn flush_with(&self, stragglers: Stragglers) {
        let writing = self.writer.clone().lock_owned().await;
        let mut plan = Plan::default();
        self.tags().take(stragglers, &mut plan);
        if !plan.is_empty() {
            self.write(plan, writing).await;
        }
    }

    /// Writes `plan` in a task of its own (so a cancelled caller cannot leave others
    /// waiting), holding the writer lock until every frame is written; the acks go
    /// first, then the requeues. Returns the requeues' results.
    async fn write(&self, plan: Plan, writing: tokio::sync::OwnedMutexGuard<()>) -> Vec<Written> {
        let channel = self.channel.clone();
        let requeued = plan.requeues.len();
        let task = tokio::spawn(async move {
            let _writing = writing;
            let Plan { multiple, singles, requeues } = plan;
            // The acks are of distinct tags, and the singles lie above the multiple's
            // prefix: their order among themselves does not matter.
            let multiple = async {
                if let Some((upto, waiters)) = multiple {
                    let result = channel.basic_ack(upto, BasicAckOptions { multiple: true }).await;
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
            };
            let singles = futures::future::join_all(singles.into_iter().map(|(tag, waiter)| {
                let channel = &channel;
                async move {
                    let result = channel.basic_ack(tag, BasicAckOptions { multiple: false }).await;
                    let _ = waiter.send(result);
                }
            }));
            futures::future::join(multiple, singles).await;
            let requeue = BasicNackOptions { multiple: false, requeue: true };
            futures::future::join_all(
                requeues.into_iter().map(|tag| channel.basic_nack(tag, requeue)),
            )
            .await
        });
        match task.await {
            Ok(results) => results,
            Err(_) => vec![Err(self.not_held()); requeued],
        }
    }

    fn not_held(&self) -> lapin::Error {
        lapin::ErrorKind::InvalidChannel(self.channel.id()).into()
    }
}

/// The prefix length written at once for a consumer with `prefetch`: a quarter of the
/// prefetch, so the broker keeps delivering while acks gather, at most
/// [`MAX_ACK_BATCH`].
fn ack_batch(prefetch: u16) -> usize {
    (usize::from(prefetch) / 4).clamp(1, MAX_ACK_BATCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(tags: &mut Tags, stragglers: Stragglers) -> (Option<u64>, Vec<u64>) {
        let mut plan = Plan::default();
        tags.take(stragglers, &mut plan);
        (plan.multiple.map(|(upto, _)| upto), plan.singles.iter().map(|(t, _)| *t).collect())
    }

    fn tracked(range: std::ops::RangeInclusive<u64>) -> Tags {
        let mut tags = Tags::default();
        for tag in range {
            tags.track(tag);
        }
        tags
    }

    #[tokio::test(start_paused = true)]
    async fn the_contiguous_completed_prefix_is_acked_with_one_multiple_ack() {
        let mut tags = tracked(1..=6);
        let now = Instant::now();
        for tag in [2, 3, 1, 5] {
            assert!(tags.complete(tag, now).is_some());
        }
        // 1..=3 are contiguous; 4 is still held, so 5 waits.
        assert_eq!(tags.prefix, 3);
        assert_eq!(tags.first_held, Some(4));
        assert!(!tags.flush_due(0, 4));
        assert!(tags.flush_due(0, 3));
        assert!(!tags.flush_due(3, 3), "due once, when the prefix reached the batch");
        assert_eq!(plan(&mut tags, Stragglers::None), (Some(3), vec![]));
        assert_eq!(tags.prefix, 0);
        // 4 completes: the prefix now reaches over 5 up to the held 6.
        assert!(tags.complete(4, now).is_some());
        assert_eq!((tags.prefix, tags.first_held), (2, Some(6)));
        assert_eq!(plan(&mut tags, Stragglers::None), (Some(5), vec![]));
        // The last one: nothing is held, so it is due at once.
        assert!(tags.complete(6, now).is_some());
        assert!(tags.flush_due(0, 64));
        assert_eq!(plan(&mut tags, Stragglers::None), (Some(6), vec![]));
        assert!(tags.entries.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn completions_held_back_by_a_slow_one_are_acked_singly_once_they_waited() {
        let mut tags = tracked(1..=4);
        let early = Instant::now();
        assert!(tags.complete(2, early).is_some());
        tokio::time::advance(Duration::from_millis(3)).await;
        let later = Instant::now();
        assert!(tags.complete(3, later).is_some());
        assert_eq!(tags.prefix, 0, "1 is still held");
        // 2 waited the interval, 3 not yet.
        let now = early + ACK_FLUSH_INTERVAL;
        assert_eq!(plan(&mut tags, Stragglers::WaitedUntil(now)), (None, vec![2]));
        assert_eq!(plan(&mut tags, Stragglers::WaitedUntil(now)), (None, vec![]));
        // 1 completes: the prefix covers 1 and 3 (2 is settled already, so the
        // multiple ack passes over it harmlessly) up to the held 4.
        assert!(tags.complete(1, now).is_some());
        assert_eq!(plan(&mut tags, Stragglers::None), (Some(3), vec![]));
        assert_eq!(tags.first_held, Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeued_tag_is_never_covered_by_a_multiple_ack_before_its_nack() {
        let mut tags = tracked(1..=4);
        let now = Instant::now();
        assert!(tags.complete(1, now).is_some());
        assert!(tags.complete(3, now).is_some());
        // Requeue 2 the way `Acks::requeue` does: take everything completed first.
        let (multiple, singles) = plan(&mut tags, Stragglers::All);
        assert_eq!((multiple, singles), (Some(1), vec![3]));
        tags.release(2);
        assert_eq!(tags.first_held, Some(4));
        assert!(tags.complete(4, now).is_some());
        assert_eq!(plan(&mut tags, Stragglers::None), (Some(4), vec![]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_is_completed_once_and_only_while_held() {
        let mut tags = tracked(1..=2);
        let now = Instant::now();
        assert!(tags.complete(1, now).is_some());
        assert!(tags.complete(1, now).is_none(), "completed twice");
        assert!(tags.complete(9, now).is_none(), "never delivered");
        tags.release(2);
        assert!(tags.complete(2, now).is_none(), "released");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_out_of_order_turns_multiple_acks_off() {
        let mut tags = tracked(1..=2);
        tags.track(5);
        assert!(tags.single);
        let now = Instant::now();
        for tag in [1, 2, 5] {
            assert!(tags.complete(tag, now).is_some());
        }
        assert!(tags.flush_due(3, 64));
        assert_eq!(plan(&mut tags, Stragglers::None), (None, vec![1, 2, 5]));
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_latest_completion_finds_the_channel_quiet() {
        let mut tags = tracked(1..=3);
        let first = Instant::now();
        assert!(tags.quiet_since(first), "no completion yet");
        assert!(tags.complete(1, first).is_some());
        assert!(tags.quiet_since(first));
        tokio::time::advance(Duration::from_micros(300)).await;
        let second = Instant::now();
        assert!(tags.complete(2, second).is_some());
        assert!(!tags.quiet_since(first), "a completion followed the first");
        assert!(tags.quiet_since(second));
    }

    #[tokio::test(start_paused = true)]
    async fn sparse_completions_are_due_at_once_while_they_come_one_at_a_time() {
        let mut tags = tracked(1..=4);
        let now = Instant::now();
        tags.sparse = true;
        assert!(tags.complete(1, now).is_some());
        assert!(tags.flush_due(0, 64), "the only completion of a sparse channel");
        assert_eq!(plan(&mut tags, Stragglers::None), (Some(1), vec![]));
        // 3 completes behind the held 2: nothing in the prefix to write.
        assert!(tags.complete(3, now).is_some());
        assert!(!tags.flush_due(0, 64));
    }

    #[test]
    fn the_batch_is_a_quarter_of_the_prefetch_within_bounds() {
        assert_eq!(ack_batch(1), 1);
        assert_eq!(ack_batch(10), 2);
        assert_eq!(ack_batch(256), 64);
        assert_eq!(ack_batch(u16::MAX), MAX_ACK_BATCH);
    }
}
