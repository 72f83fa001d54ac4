//! Group commit: writes that callers make while earlier calls are on their way go together in the next
//! call, each caller still waiting for (and getting) its own answer. The Redis broker's consumers store
//! final states with their acknowledgements this way (`redis/broker/finisher.rs`), and RabbitMQ
//! consumers send their acknowledgements (`amqp/broker/acks.rs`).
//!
//! Nothing waits to fill a batch, and no task of its own carries them: a caller that finds fewer calls
//! on their way than allowed makes the call itself, with whatever is waiting; a caller that comes
//! meanwhile waits, and the call that ends next hands the waiting ones over to one of them, which makes
//! the next call. A lone write therefore goes at once, on its caller's thread, as it did alone.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Most entries one call carries (the rest go in the next): smaller calls overlap better, and their
/// buffers stay small (a Redis worker at concurrency 100 drained 65.6k tasks/s and kept 30 MiB with 32,
/// 61.7k and 50 MiB with 128; `docs/benchmarks.md`, issue 15's sixth session).
pub(crate) const MOST_PER_CALL: usize = 32;

/// One entry's answer from a call: done, refused by the server (writing it again cannot help), or
/// failed (its call did not complete: it may or may not be written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Written.
    Done,
    /// The server refused this entry (writing it again cannot help); the text says why.
    Refused(String),
    /// Its call did not complete (the entry may or may not be written); the text says why.
    Failed(String),
}

/// What a waiting caller is told: its answer, or that it makes the next call.
enum Word<E> {
    Answer(Answer),
    Lead(Baton<E>),
}

/// The next call's batch, handed to the waiting caller that makes it. Dropped untaken (its caller went
/// away between being told and reading it), it frees the call's place for the callers still waiting,
/// as a dropped call does.
struct Baton<E> {
    batch: Option<Batch<E>>,
    queue: Arc<Mutex<Queue<E>>>,
}

impl<E> Baton<E> {
    fn take(mut self) -> Option<Batch<E>> {
        self.batch.take()
    }
}

impl<E> Drop for Baton<E> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            // Its callers learn nothing (their words go with it), and the place goes on.
            drop(batch);
            hand_over(&self.queue);
        }
    }
}

/// A call's entries: the caller's own, and those of the callers it answers.
struct Batch<E> {
    own: E,
    others: Vec<Waiting<E>>,
}

struct Waiting<E> {
    entry: E,
    word: oneshot::Sender<Word<E>>,
}

struct Queue<E> {
    waiting: Vec<Waiting<E>>,
    in_flight: usize,
}

/// Batches the entries given to [`GroupCommit::commit`] into calls of `call` (clones share the batching).
pub(crate) struct GroupCommit<E> {
    most_in_flight: usize,
    queue: Arc<Mutex<Queue<E>>>,
}

impl<E> Clone for GroupCommit<E> {
    fn clone(&self) -> Self {
        GroupCommit {
            most_in_flight: self.most_in_flight,
            queue: self.queue.clone(),
        }
    }
}

impl<E> GroupCommit<E> {
    /// Batching with at most `most_in_flight` calls on their way at once (at least one).
    pub(crate) fn new(most_in_flight: usize) -> Self {
        GroupCommit {
            most_in_flight: most_in_flight.max(1),
            queue: Arc::new(Mutex::new(Queue {
                waiting: Vec::new(),
                in_flight: 0,
            })),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue<E>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `entry` with whatever other entries come meanwhile, through `call`, which gets the entries
    /// of one call and returns one answer per entry, in order. Every caller must pass the same `call`.
    pub(crate) async fn commit<C, F>(&self, entry: E, call: C) -> Answer
    where
        C: Fn(Vec<E>) -> F,
        F: Future<Output = Vec<Answer>>,
    {
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
                Ok(Word::Lead(baton)) => match baton.take() {
                    Some(batch) => batch,
                    None => return Answer::Failed("an empty baton".into()),
                },
                Err(_) => return Answer::Failed("the call that carried it was dropped".into()),
            },
        };
        let mut lead = Lead {
            commit: self,
            done: false,
        };
        let Batch { own, others } = batch;
        let (words, mut entries): (Vec<_>, Vec<_>) = others
            .into_iter()
            .map(|waiting| (waiting.word, waiting.entry))
            .unzip();
        entries.insert(0, own);
        let count = entries.len();
        let mut answers = call(entries).await;
        if answers.len() != count {
            let text = format!("{} answers for {count} writes", answers.len());
            answers = vec![Answer::Failed(text); count];
        }
        let mut answers = answers.into_iter();
        let own = answers.next().unwrap_or(Answer::Failed(String::new()));
        for (word, answer) in words.into_iter().zip(answers) {
            // A caller dropped meanwhile has nobody to tell.
            let _ = word.send(Word::Answer(answer));
        }
        lead.hand_over();
        own
    }
}

/// Up to `most` of the waiting callers, in the order they came.
fn take<E>(waiting: &mut Vec<Waiting<E>>, most: usize) -> Vec<Waiting<E>> {
    let most = most.min(waiting.len());
    waiting.drain(..most).collect()
}

/// A call on its way: when it ends (or is dropped), the waiting callers get a call of their own.
struct Lead<'a, E> {
    commit: &'a GroupCommit<E>,
    done: bool,
}

impl<E> Lead<'_, E> {
    fn hand_over(&mut self) {
        self.done = true;
        hand_over(&self.commit.queue);
    }
}

/// Hands the waiting callers over to one of them, which makes their call; or, with none waiting, frees
/// the place of the call that ended.
fn hand_over<E>(shared: &Arc<Mutex<Queue<E>>>) {
    let mut queue = shared.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if queue.waiting.is_empty() {
            queue.in_flight -= 1;
            return;
        }
        let mut batch = take(&mut queue.waiting, MOST_PER_CALL);
        let first = batch.remove(0);
        let baton = Baton {
            batch: Some(Batch {
                own: first.entry,
                others: batch,
            }),
            queue: Arc::clone(shared),
        };
        match first.word.send(Word::Lead(baton)) {
            Ok(()) => return,
            // That caller was dropped: the next one leads the rest (the dropped one's entry goes
            // unwritten, as its caller is no longer there to tell).
            Err(Word::Lead(baton)) => {
                let others = baton.take().map(|batch| batch.others).unwrap_or_default();
                let rest = std::mem::take(&mut queue.waiting);
                queue.waiting = others;
                queue.waiting.extend(rest);
            }
            Err(Word::Answer(_)) => return,
        }
    }
}

impl<E> Drop for Lead<'_, E> {
    fn drop(&mut self) {
        // A call dropped on its way (its caller cancelled): the entries it carried learn nothing, but
        // the callers waiting behind it still get their call.
        if !self.done {
            self.hand_over();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A call that takes a while and answers each entry by its value (odd ones refused).
    async fn slow_call(calls: &AtomicUsize, entries: Vec<u32>) -> Vec<Answer> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        entries
            .into_iter()
            .map(|n| match n % 2 {
                0 => Answer::Done,
                _ => Answer::Refused(format!("odd {n}")),
            })
            .collect()
    }

    #[tokio::test]
    async fn writes_made_meanwhile_share_calls_and_each_gets_its_own_answer() {
        let commit = GroupCommit::new(1);
        let calls = AtomicUsize::new(0);
        let writes = (0..20u32).map(|n| {
            let (commit, calls) = (&commit, &calls);
            async move {
                (
                    n,
                    commit.commit(n, |entries| slow_call(calls, entries)).await,
                )
            }
        });
        let answers = futures_util::future::join_all(writes).await;
        for (n, answer) in answers {
            let expected = match n % 2 {
                0 => Answer::Done,
                _ => Answer::Refused(format!("odd {n}")),
            };
            assert_eq!(answer, expected);
        }
        // The first goes alone; the other 19 wait for it and go together.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_caller_dropped_before_it_takes_up_its_call_frees_the_place() {
        use futures_util::FutureExt as _;
        let commit = GroupCommit::new(1);
        let calls = AtomicUsize::new(0);
        let call = |entries| slow_call(&calls, entries);
        let mut first = Box::pin(commit.commit(0, call));
        let mut second = Box::pin(commit.commit(2, call));
        let mut third = Box::pin(commit.commit(4, call));
        // The first makes a call; the others wait behind it.
        assert!((&mut first).now_or_never().is_none());
        assert!((&mut second).now_or_never().is_none());
        assert!((&mut third).now_or_never().is_none());
        assert_eq!(first.await, Answer::Done);
        // The first handed the next call to the second, which goes away without taking it up.
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(1), third).await;
        assert!(
            matches!(third, Ok(Answer::Failed(_))),
            "the third was in the dropped batch: told it failed, not left waiting ({third:?})"
        );
        let later = tokio::time::timeout(Duration::from_secs(1), commit.commit(6, call)).await;
        assert_eq!(later, Ok(Answer::Done), "a later write still gets a call");
        assert_eq!(commit.queue().in_flight, 0);
    }

    #[tokio::test]
    async fn a_dropped_call_still_hands_the_waiting_writes_over() {
        let commit = GroupCommit::new(1);
        let calls = AtomicUsize::new(0);
        let never = |_: Vec<u32>| std::future::pending::<Vec<Answer>>();
        let first = tokio::time::timeout(Duration::from_millis(50), commit.commit(1, never));
        let second = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            commit.commit(2, |entries| slow_call(&calls, entries)).await
        };
        let (first, second) = tokio::join!(first, second);
        assert!(
            first.is_err(),
            "the first call never ends: its caller gives up"
        );
        assert_eq!(
            second,
            Answer::Done,
            "the waiting write got a call of its own"
        );
        assert_eq!(commit.queue().in_flight, 0);
    }
}
