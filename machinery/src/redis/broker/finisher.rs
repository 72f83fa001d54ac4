//! Group commit of final states: the tasks of one consumer that finish while earlier calls are on their
//! way store their states and acknowledge their messages together, in one `finish_many` script call,
//! instead of one round trip (and one script run) each.
//!
//! Nothing waits to fill a batch, and no task of its own carries them: a task that finds fewer calls on
//! their way than the worker's concurrency allows ([`SLOTS_PER_CALL`]) makes the call itself, with
//! whatever is waiting; a task that finishes meanwhile waits, and the call that ends next hands the
//! waiting ones over to one of them, which makes the next call. A lone task therefore goes at once, on
//! its own thread, as it did alone.
//!
//! Each task still has its state written before its message leaves the in-flight list, in the same
//! atomic step on the server, and learns its own answer: a task whose write the server refused (its
//! key holds a list, say) or whose call failed falls back to the two-step road (state, then
//! acknowledgement), as a lone call's failure does.

use std::sync::{Arc, Mutex, MutexGuard};

use redis::Value;
use tokio::sync::oneshot;

use super::{retrying_redis, Inner};
use crate::broker::BrokerError;
use crate::redis::backend::{FinishEntry, RedisBackend};
use crate::redis::conn::Healing;
use crate::redis::lua::is_noscript;
use crate::wire::state::TaskState;

/// Most tasks one `finish_many` call carries (the rest go in the next).
const MOST_PER_CALL: usize = 128;

/// Worker slots per `finish_many` call that may be on its way at once: one call at concurrency 10, where
/// tasks that wait for it make bigger calls (Redis is the busier side); three at concurrency 100, where
/// more calls overlap their round trips. (`docs/benchmarks.md`, issue 15's sixth session: at 10, one
/// call drained 50k tasks/s against 47k with two; at 100, three 61k against 52k with one.)
const SLOTS_PER_CALL: usize = 40;

const OPERATION: &str = "store the states and acknowledge";

/// What a waiting task is told: its answer, or that it makes the next call, for itself and the others.
enum Word {
    Answer(Result<(), BrokerError>),
    Lead(Batch),
}

/// A call's tasks: the one making it, and those it answers.
struct Batch {
    own: FinishEntry,
    others: Vec<Waiting>,
}

/// A task waiting for its answer, or to make the next call.
struct Waiting {
    entry: FinishEntry,
    word: oneshot::Sender<Word>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    in_flight: usize,
}

/// The handle through which the deliveries of one consumer store their final states and acknowledge.
#[derive(Clone)]
pub(super) struct Finisher {
    inner: Arc<Inner>,
    states: RedisBackend,
    inflight: Arc<str>,
    /// Most calls on their way at once.
    most_in_flight: usize,
    queue: Arc<Mutex<Queue>>,
}

impl Finisher {
    /// The group commit of the consumer whose in-flight list is `inflight`, for a worker running
    /// `concurrency` tasks at once.
    pub(super) fn new(
        inner: Arc<Inner>,
        states: RedisBackend,
        inflight: &str,
        concurrency: usize,
    ) -> Finisher {
        Finisher {
            inner,
            states,
            inflight: inflight.into(),
            most_in_flight: 1 + concurrency / SLOTS_PER_CALL,
            queue: Arc::default(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `state` and then removes `message` from the in-flight list, in one step on the server,
    /// together with whatever other tasks of this consumer finish meanwhile. An error leaves the message
    /// in flight (the state may or may not be stored).
    pub(super) async fn finish(
        &self,
        state: &TaskState,
        message: &[u8],
    ) -> Result<(), BrokerError> {
        let entry = self
            .states
            .finish_entry(state, message.to_vec())
            .map_err(|error| BrokerError::operation(OPERATION, error))?;
        let turn = {
            let mut queue = self.queue();
            if queue.in_flight < self.most_in_flight {
                queue.in_flight += 1;
                let others = take(&mut queue.waiting, MOST_PER_CALL - 1);
                Ok(Batch { own: entry, others })
            } else {
                let (word, told) = oneshot::channel();
                queue.waiting.push(Waiting { entry, word });
                Err(told)
            }
        };
        let batch = match turn {
            Ok(batch) => batch,
            Err(told) => match told.await {
                Ok(Word::Answer(answer)) => return answer,
                Ok(Word::Lead(batch)) => batch,
                // The call that held it was dropped before it answered.
                Err(_) => return Err(BrokerError::Closed),
            },
        };
        let mut lead = Lead {
            finisher: self,
            done: false,
        };
        let answer = lead.call(batch).await;
        lead.hand_over();
        answer
    }
}

/// Up to `most` of the waiting tasks, in the order they came.
fn take(waiting: &mut Vec<Waiting>, most: usize) -> Vec<Waiting> {
    let most = most.min(waiting.len());
    waiting.drain(..most).collect()
}

/// A call in flight: when it ends (or is dropped), the waiting tasks get a call of their own.
struct Lead<'a> {
    finisher: &'a Finisher,
    done: bool,
}

impl Lead<'_> {
    /// Makes one call for `batch`, answers the others, and returns the own task's answer.
    async fn call(&mut self, batch: Batch) -> Result<(), BrokerError> {
        let Batch { own, others } = batch;
        let (mut entries, words): (Vec<_>, Vec<_>) = others
            .into_iter()
            .map(|waiting| (waiting.entry, waiting.word))
            .unzip();
        entries.insert(0, own);
        let finisher = self.finisher;
        let replies = call(
            &finisher.inner,
            &finisher.states,
            &finisher.inflight,
            &entries,
        )
        .await;
        let mut answers: Vec<Result<(), BrokerError>> = match replies {
            Ok(replies) if replies.len() == entries.len() => {
                replies.into_iter().map(task_answer).collect()
            }
            Ok(replies) => {
                let text = format!("{} answers for {} tasks", replies.len(), entries.len());
                failed(&text, entries.len())
            }
            Err(error) => failed(&error.to_string(), entries.len()),
        };
        let own = answers.remove(0);
        for (word, answer) in words.into_iter().zip(answers) {
            // A task whose run was dropped meanwhile has nobody to tell.
            let _ = word.send(Word::Answer(answer));
        }
        own
    }

    /// Hands the waiting tasks over to one of them, which makes their call; or, with none waiting,
    /// frees this call's place.
    fn hand_over(&mut self) {
        self.done = true;
        let mut queue = self.finisher.queue();
        loop {
            if queue.waiting.is_empty() {
                queue.in_flight -= 1;
                return;
            }
            let mut batch = take(&mut queue.waiting, MOST_PER_CALL);
            let first = batch.remove(0);
            let lead = Word::Lead(Batch {
                own: first.entry,
                others: batch,
            });
            match first.word.send(lead) {
                Ok(()) => return,
                // Its run was dropped: the next waiting task leads them (its own entry is lost with it:
                // its message stays in flight and runs again).
                Err(Word::Lead(Batch { others, .. })) => {
                    let rest = std::mem::take(&mut queue.waiting);
                    queue.waiting = others;
                    queue.waiting.extend(rest);
                }
                Err(Word::Answer(_)) => return,
            }
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        // A call dropped on its way (its run cancelled): the tasks it carried learn nothing (their
        // messages stay in flight), but those waiting behind it still get their call.
        if !self.done {
            self.hand_over();
        }
    }
}

fn failed(text: &str, count: usize) -> Vec<Result<(), BrokerError>> {
    (0..count)
        .map(|_| Err(BrokerError::operation(OPERATION, text.to_owned())))
        .collect()
}

/// One `finish_many` call (retried on connection errors; the scripts loaded again after `NOSCRIPT`).
async fn call(
    inner: &Inner,
    states: &RedisBackend,
    inflight: &str,
    entries: &[FinishEntry],
) -> Result<Vec<Value>, BrokerError> {
    let mut pipe = redis::pipe();
    pipe.add_command(states.finish_many_cmd(inflight, entries));
    let pipe = &pipe;
    let send = move |conn: Healing| async move { conn.write_returning::<Vec<Value>>(pipe).await };
    let mut replies = retrying_redis(OPERATION, &inner.conn, send).await;
    if replies.as_ref().is_err_and(is_noscript) {
        states
            .load_scripts(&mut inner.conn.clone())
            .await
            .map_err(|error| BrokerError::operation(OPERATION, error))?;
        replies = retrying_redis(OPERATION, &inner.conn, send).await;
    }
    replies.map_err(|error| BrokerError::operation(OPERATION, error))
}

/// One task's answer from the script: 1 for its state written and its message acknowledged, else the
/// text of the error that refused its write.
fn task_answer(reply: Value) -> Result<(), BrokerError> {
    match reply {
        Value::Int(1) => Ok(()),
        Value::BulkString(text) => Err(BrokerError::operation(
            OPERATION,
            String::from_utf8_lossy(&text).into_owned(),
        )),
        other => Err(BrokerError::operation(
            OPERATION,
            format!("unexpected answer from the finish script: {other:?}"),
        )),
    }
}
