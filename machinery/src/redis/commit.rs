//! Group commit: the acknowledgements (and the final states that ride with them), or the final states
//! alone on a result backend, of tasks that finish close together go to Redis in one pipeline: one
//! round trip and one socket read on the server for many tasks instead of one each.
//!
//! Nothing waits on a timer. A finishing task hands its command to a flusher task and awaits the answer;
//! the flusher sends whatever has queued up since its last pipeline left, so that a lone task goes at
//! once and a burst (a fetched batch finishing together, or many batches under load) shares a pipeline.
//! Each command keeps its own outcome (`ignore_errors`): one task's refused state write fails that task's
//! acknowledgement alone, and the worker stores it the slow way as before. Every command in a pipeline is
//! safe to send again (a state write of the same state, an `LREM` of a message already gone removes
//! nothing), which is what lets a pipeline that lost its connection be retried whole.

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use redis::{Cmd, Pipeline, RedisError, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use super::backend::load_state_scripts;
use super::broker::retrying_redis;
use super::conn::{is_noscript, not_replicated, Healing, WAIT_TIMEOUT};

/// The most commands one pipeline carries.
const MOST_PER_PIPELINE: usize = 256;

/// How many pipelines may be on their way at once: enough to keep the link busy while a slow one
/// answers, few enough that a burst still shares pipelines.
const MOST_IN_FLIGHT: usize = 4;

/// A command waiting for its pipeline, and where its outcome goes.
struct Request {
    cmd: Cmd,
    outcome: oneshot::Sender<RedisResult<()>>,
}

/// Hands commands to a flusher task on the current runtime, started on first use and again if the
/// runtime it ran on has gone (a `Server` can outlive the runtime that made it, as in tests).
#[derive(Debug)]
pub(crate) struct GroupCommit {
    conn: Healing,
    /// Whether a pipeline that failed for connection reasons goes again (the broker's acknowledgements);
    /// a result backend's writes fail at once, as they did one by one, and the worker decides.
    retry: bool,
    flusher: std::sync::Mutex<Option<mpsc::UnboundedSender<Request>>>,
}

impl GroupCommit {
    pub(crate) fn new(conn: Healing, retry: bool) -> GroupCommit {
        GroupCommit {
            conn,
            retry,
            flusher: std::sync::Mutex::new(None),
        }
    }

    /// Runs `cmd` in the next pipeline and returns its own outcome.
    pub(crate) async fn run(&self, cmd: Cmd) -> RedisResult<()> {
        let (outcome, answer) = oneshot::channel();
        self.sender()?
            .send(Request { cmd, outcome })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    fn sender(&self) -> RedisResult<mpsc::UnboundedSender<Request>> {
        let mut flusher = self.flusher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = flusher.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| stopped())?;
        let (sender, requests) = mpsc::unbounded_channel();
        runtime.spawn(flush_loop(requests, self.conn.clone(), self.retry));
        *flusher = Some(sender.clone());
        Ok(sender)
    }
}

fn stopped() -> RedisError {
    RedisError::from((
        redis::ErrorKind::Io,
        "the group commit stopped (its runtime shut down)",
    ))
}

/// Sends what has queued up, up to [`MOST_IN_FLIGHT`] pipelines at a time, until every sender is gone.
async fn flush_loop(mut requests: mpsc::UnboundedReceiver<Request>, conn: Healing, retry: bool) {
    let mut flushing = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = flushing.next(), if !flushing.is_empty() => {}
            request = requests.recv(), if flushing.len() < MOST_IN_FLIGHT => {
                let Some(first) = request else { break };
                let mut batch = vec![first];
                while batch.len() < MOST_PER_PIPELINE {
                    match requests.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                flushing.push(flush(&conn, retry, batch));
            }
        }
    }
    while flushing.next().await.is_some() {}
}

/// Sends one pipeline and tells each request its own outcome; commands refused with `NOSCRIPT` go again
/// once the scripts are loaded.
async fn flush(conn: &Healing, retry: bool, batch: Vec<Request>) {
    let mut pipe = redis::pipe();
    let mut outcomes = Vec::with_capacity(batch.len());
    for request in batch {
        pipe.add_command(request.cmd);
        outcomes.push(request.outcome);
    }
    pipe.ignore_errors();
    let mut results = send(conn, retry, &pipe).await;
    if let Ok(each) = &mut results {
        let unloaded: Vec<usize> = (0..each.len())
            .filter(|&i| matches!(&each[i], Err(error) if is_noscript(error)))
            .collect();
        if !unloaded.is_empty() {
            let mut again = redis::pipe();
            again.ignore_errors();
            for (i, cmd) in pipe.cmd_iter().enumerate() {
                if unloaded.contains(&i) {
                    again.add_command(cmd.clone());
                }
            }
            let resent = match load_state_scripts(&mut conn.clone()).await {
                Ok(()) => send(conn, retry, &again).await,
                Err(error) => Err(error),
            };
            for (position, &i) in unloaded.iter().enumerate() {
                each[i] = match &resent {
                    Ok(again) => again.get(position).cloned().unwrap_or_else(|| Err(short())),
                    Err(error) => Err(error.clone()),
                };
            }
        }
    }
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let result = match &results {
            Ok(each) => each.get(i).cloned().unwrap_or_else(|| Err(short())),
            Err(error) => Err(error.clone()),
        };
        // The task that asked may be gone (its worker aborted); its message then stays in flight.
        let _ = outcome.send(result);
    }
}

/// Runs `pipe`, which ignores errors (retried whole on connection errors if `retry`), and returns each
/// command's own outcome.
async fn send(conn: &Healing, retry: bool, pipe: &Pipeline) -> RedisResult<Vec<RedisResult<()>>> {
    let each = if retry {
        retrying_redis("acknowledge a batch", conn, move |conn| async move {
            write_each(conn, pipe).await
        })
        .await?
    } else {
        write_each(conn.clone(), pipe).await?
    };
    Ok(each.into_iter().map(|r| r.map(drop)).collect())
}

/// [`Healing::write`] for a pipeline whose commands each keep their outcome: with `REDIS_WAIT_REPLICAS=n`
/// it ends with `WAIT n` and fails whole unless `n` replicas acknowledged the writes.
async fn write_each(mut conn: Healing, pipe: &Pipeline) -> RedisResult<Vec<RedisResult<Value>>> {
    let wanted = conn.wait_replicas();
    if wanted == 0 {
        return pipe.query_async(&mut conn).await;
    }
    let mut pipe = pipe.clone();
    pipe.cmd("WAIT")
        .arg(wanted)
        .arg(WAIT_TIMEOUT.as_millis() as u64);
    let mut each: Vec<RedisResult<Value>> = pipe.query_async(&mut conn).await?;
    let acknowledged = match each.pop() {
        Some(Ok(Value::Int(n))) => u32::try_from(n).unwrap_or(0),
        Some(Err(error)) => return Err(error),
        _ => 0,
    };
    not_replicated(acknowledged, wanted)?;
    Ok(each)
}

fn short() -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "the pipeline answered fewer commands than it carried",
    ))
}
