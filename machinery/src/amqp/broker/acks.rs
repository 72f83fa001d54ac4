//! The acknowledgements of one consumer channel, group-committed: the acks asked for while one is on
//! its way go together in the next call, and a run of them that leaves no unsettled delivery below it
//! goes as one `basic.ack` with `multiple` (one frame for RabbitMQ to read instead of one a message).
//!
//! `multiple` acknowledges every unsettled delivery up to its tag, so the channel keeps the tags it has
//! handed out and not settled ([`Acks::delivered`]): a run is acknowledged together only when every
//! unsettled tag below its highest is in the call. A task still running below keeps its message
//! unacknowledged; the acks above it then go one by one, as they did before. A tag given back
//! (`basic.nack`) leaves the set only once its frame is sent, so a later `multiple` cannot cover it and
//! make the `nack` name a tag RabbitMQ no longer knows (which would close the channel). One call is on
//! its way at a time: two calls planned side by side could send a `multiple` that covers the other's
//! tags before the other's frame.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::DeliveryTag;

use crate::amqp::session;
use crate::group_commit::{Answer, GroupCommit};

/// What an acker that was already used, or whose channel closed, is answered.
const CHANNEL_GONE: &str = "the channel is gone";

/// How long a call waits for lapin to send its frames. lapin drops an ack whose channel closes between
/// the acker's own check and its I/O loop, and its promise then never resolves (lapin 4.12,
/// `internal_rpc.rs`, `channel_ok`); without a bound, every later ack of that channel would wait behind
/// it for ever, each holding one of the worker's finish slots. Frames are queued long before this, in
/// order, so a call that gives up cannot let a later `multiple` overtake its frames.
const FRAMES_SENT_WITHIN: Duration = Duration::from_secs(10);

/// The acknowledgements of one channel (see the module docs).
pub(super) struct Acks {
    /// Tags handed out on this channel and not settled yet.
    unsettled: Mutex<BTreeSet<DeliveryTag>>,
    commit: GroupCommit<Tagged>,
}

impl Default for Acks {
    fn default() -> Self {
        Acks {
            unsettled: Mutex::default(),
            // One call at a time: see the module docs.
            commit: GroupCommit::new(1),
        }
    }
}

/// One delivery's handle on its channel: its tag, lapin's acker, and the channel's [`Acks`].
#[derive(Clone)]
pub(super) struct Tagged {
    tag: DeliveryTag,
    acker: lapin::Acker,
    acks: Arc<Acks>,
}

impl Acks {
    /// Records a delivery as it comes off the channel (every one, held back or handed out), so that no
    /// `multiple` covers it before it is settled.
    pub(super) fn delivered(self: &Arc<Self>, tag: DeliveryTag, acker: lapin::Acker) -> Tagged {
        session::lock(&self.unsettled).insert(tag);
        Tagged {
            tag,
            acker,
            acks: self.clone(),
        }
    }

    /// Sends one call's acks: the run that leaves nothing unsettled below it as one `multiple` (at its
    /// highest tag), the rest one by one. Answers each in order.
    async fn send(&self, batch: Vec<Tagged>) -> Vec<Answer> {
        let highest = self.plan(&batch);
        let (run, alone): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| highest.is_some_and(|tag| batch[i].tag <= tag));
        let run_ack = run
            .iter()
            .find(|&&i| Some(batch[i].tag) == highest)
            .map(|&i| {
                let multiple = run.len() > 1;
                batch[i].acker.ack(BasicAckOptions { multiple })
            });
        let alone_acks = alone
            .iter()
            .map(|&i| batch[i].acker.ack(BasicAckOptions { multiple: false }));
        let sending = futures_util::future::join(
            futures_util::future::OptionFuture::from(run_ack),
            futures_util::future::join_all(alone_acks),
        );
        let Ok((run_result, alone_results)) =
            tokio::time::timeout(FRAMES_SENT_WITHIN, sending).await
        else {
            let reason = format!("not sent within {FRAMES_SENT_WITHIN:?}");
            return vec![Answer::Failed(reason); batch.len()];
        };
        let mut answers = vec![Answer::Done; batch.len()];
        if let Some(result) = run_result {
            let answer = answer(result);
            for &i in &run {
                answers[i] = answer.clone();
            }
        }
        for (&i, result) in alone.iter().zip(alone_results) {
            answers[i] = answer(result);
        }
        answers
    }

    /// Takes the batch's tags out of the unsettled set and returns the highest tag of the run, from the
    /// lowest unsettled tag up, that the batch holds whole (`None`: the lowest is not in the batch).
    fn plan(&self, batch: &[Tagged]) -> Option<DeliveryTag> {
        let tags: HashSet<DeliveryTag> = batch.iter().map(|tagged| tagged.tag).collect();
        let mut unsettled = session::lock(&self.unsettled);
        let highest = unsettled
            .iter()
            .take_while(|tag| tags.contains(tag))
            .last()
            .copied();
        for tag in &tags {
            unsettled.remove(tag);
        }
        highest
    }

    fn settled(&self, tag: DeliveryTag) {
        session::lock(&self.unsettled).remove(&tag);
    }
}

/// What one `basic.ack` came to.
fn answer(result: lapin::Result<bool>) -> Answer {
    match result {
        Ok(true) => Answer::Done,
        Ok(false) => Answer::Refused(CHANNEL_GONE.into()),
        Err(error) => Answer::Failed(error.to_string()),
    }
}

impl Tagged {
    /// Acknowledges the delivery, with whatever other acks of its channel come meanwhile.
    pub(super) async fn ack(&self) -> Answer {
        self.acks
            .commit
            .commit(self.clone(), |batch| self.acks.send(batch))
            .await
    }

    /// Gives the delivery back to its queue (`basic.nack` with requeue). `Ok(false)`: the acker was
    /// used, or its channel is gone (RabbitMQ puts the message back itself).
    pub(super) async fn give_back(&self) -> lapin::Result<bool> {
        let result = self
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await;
        // Only now: until its frame is sent, no `multiple` may cover it.
        self.acks.settled(self.tag);
        result
    }
}
