//! What a worker does with one delivery: decode it, run the task, store the outcome, send follow-up
//! tasks (callbacks, chord callback, retry), and only then acknowledge it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::Instrument;

use super::call;
use super::follow_up::{self, FollowUpFailed};
use super::health::BackendHealth;
use super::log;
use super::registry::{Registered, Registry};
use super::slot::Slot;
use super::Hooks;
use crate::backend::BackendError;
use crate::broker::Delivery;
use crate::retry::{fibonacci_next, Backoff};
use crate::task::{FailureKind, TaskDef, TaskFailure};
use crate::telemetry::{metrics, trace};
use crate::wire::signature::{Signature, RATE_SLOT_HEADER, RETRY_ATTEMPT_HEADER};
use crate::wire::state::{State, TaskResult, TaskState};
use crate::Server;

/// What every delivery of one worker needs.
pub(crate) struct WorkerContext {
    pub(crate) server: Server,
    pub(crate) registry: Registry,
    pub(crate) queue: String,
    pub(crate) hooks: Hooks,
    /// Whether the result backend answers ([`BackendHealth`]).
    pub(crate) backend_health: BackendHealth,
    /// Running, succeeded and failed tasks, published with the consumer's heartbeat where it has one.
    pub(crate) counters: std::sync::Arc<crate::broker::WorkerCounters>,
    /// The tasks running here, for cancellation requests.
    pub(crate) control: std::sync::Arc<super::control::Control>,
}

impl std::error::Error for TaskFailure {}

/// A delivery that decoded into a task this worker knows, with the span it runs in.
pub(crate) struct Ready<'c> {
    /// The task, with its metrics handles (found once, at decode).
    task: &'c Registered,
    /// Shared from here on (with the run's context): what follows moves a pointer, not the message.
    signature: Arc<Signature>,
    delivery: Delivery,
    span: tracing::Span,
}

impl Ready<'_> {
    /// The STARTED a worker stores before running it (with its RECEIVED,
    /// [`Backend::set_started_many`](crate::backend::Backend::set_started_many)), kept to become its
    /// SUCCESS.
    pub(super) fn started_state(&self) -> TaskState {
        TaskState::started(&self.signature.uuid, &self.signature.name)
    }

    /// The task's id.
    pub(super) fn uuid(&self) -> &str {
        &self.signature.uuid
    }

    /// The span it runs in.
    pub(super) fn span(&self) -> &tracing::Span {
        &self.span
    }
}

/// Decodes a delivery. Malformed messages and unknown tasks are settled here (dead-lettered or requeued)
/// and give `None`. Those roads are boxed: every delivery's decode would otherwise carry their futures'
/// size (a few KB, copied for each message).
pub(crate) async fn decode(ctx: &WorkerContext, delivery: Delivery) -> Option<Ready<'_>> {
    let mut signature = match Signature::from_json(&delivery.body) {
        Ok(signature) => signature,
        Err(error) => {
            Box::pin(dead_letter_malformed(ctx, delivery, error)).await;
            return None;
        }
    };
    let Some(registered) = ctx.registry.get(&signature.name) else {
        Box::pin(super::unknown::unknown_task(ctx, signature, delivery)).await;
        return None;
    };
    if signature.uuid == ctx.queue || signature.uuid == signature.routing_key {
        // Its state, stored by id, would replace the queue (on Redis); nothing it does can be recorded.
        let reason = format!(
            "the task's state cannot be stored: the id names a queue ({:?}), its own",
            signature.uuid
        );
        tracing::warn!(queue = %ctx.queue, %reason, "dead-lettering a task whose id names its queue");
        metrics::dead_lettered(&ctx.queue, metrics::DeadLetterReason::Unstorable);
        Box::pin(settle("dead-letter", delivery.dead_letter(reason))).await;
        return None;
    }
    if follow_up::is_chord_member(&signature) {
        if let Some(reason) = Box::pin(follow_up::impossible_chord_member(ctx, &signature)).await {
            tracing::warn!(queue = %ctx.queue, %reason, "dead-lettering a chord member that could only fire its chord early");
            metrics::dead_lettered(&ctx.queue, metrics::DeadLetterReason::Malformed);
            Box::pin(async {
                store_dead_letter_state(ctx, &signature.uuid, &signature.name, &reason).await;
                settle("dead-letter", delivery.dead_letter(reason)).await;
            })
            .await;
            return None;
        }
    }
    let span = tracing::info_span!(
        "task",
        task.name = %signature.name,
        task.uuid = %signature.uuid,
        task.retry = signature.retry_count,
        queue = %ctx.queue,
        outcome = tracing::field::Empty,
    );
    trace::adopt_parent(&span, signature.headers.as_ref());
    registered.metrics.received();
    log::received(&signature, delivery.redelivered);
    follow_up::mark_if_redelivered(&mut signature, &delivery);
    Some(Ready {
        task: registered,
        signature: Arc::new(signature),
        delivery,
        span,
    })
}

/// Whether a fetched task may run, once its RECEIVED and STARTED are stored ([`super::start`]).
pub(crate) enum Start {
    /// Run it.
    Run,
    /// Its SUCCESS is stored already (an earlier copy of its message ran): send its follow-ups with
    /// these results, without running it again.
    Succeeded(Vec<TaskResult>),
    /// It was revoked: acknowledge it without running it.
    Revoked,
    /// Its states can never be stored (a [permanent](BackendError::is_permanent) error, such as an id that
    /// names one of the backend's own keys): dead-letter it without running it, since its outcome could
    /// not be stored either.
    Refused(BackendError),
    /// Its states could not be stored for a transient reason: the backend is down (see
    /// [`BackendHealth`]), so its outcome could not be stored either; or the
    /// record that refused the write changed before it could be read. Put it back without running it.
    PutBack,
}

/// Runs a started task (or acknowledges a revoked one without running it) in its span. `started` is the
/// STARTED stored for it, which becomes its SUCCESS.
pub(crate) async fn run(
    ctx: &WorkerContext,
    ready: Ready<'_>,
    start: Start,
    started: TaskState,
    mut slot: Slot,
) {
    let Ready {
        task,
        mut signature,
        delivery,
        span,
    } = ready;
    async move {
        match start {
            Start::Run => run_task(ctx, task, signature, delivery, started, None, &mut slot).await,
            Start::Succeeded(results) => {
                tracing::info!("the task's SUCCESS is already stored; its follow-ups are sent without running it again");
                metrics::not_run_again(&signature.name);
                // Not shared yet: no copy is made.
                follow_up::mark_sent_again(Arc::make_mut(&mut signature));
                let earlier = Some(results);
                run_task(ctx, task, signature, delivery, started, earlier, &mut slot).await
            }
            Start::Revoked => {
                tracing::info!("task was revoked; acknowledging it without running it");
                tracing::Span::current().record("outcome", "REVOKED");
                settle("ack", delivery.ack()).await;
            }
            Start::Refused(error) => {
                let reason = format!("the task's state cannot be stored: {error}");
                tracing::error!(%reason, "dead-lettering a task whose states can never be stored; it does not run");
                tracing::Span::current().record("outcome", "DEAD_LETTERED");
                metrics::dead_lettered(&ctx.queue, metrics::DeadLetterReason::Unstorable);
                settle("dead-letter", delivery.dead_letter(reason)).await;
            }
            Start::PutBack => {
                tracing::debug!("the result backend is down; the task goes back to the queue unrun");
                let body = delivery.body.clone();
                settle("requeue", delivery.requeue(body)).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Dead-letters a message that does not decode as a signature, saying why.
async fn dead_letter_malformed(ctx: &WorkerContext, delivery: Delivery, error: serde_json::Error) {
    let reason = format!("malformed message: cannot decode the task signature: {error}");
    tracing::warn!(queue = %ctx.queue, %reason, "dead-lettering a message that is not a task signature");
    metrics::dead_lettered(&ctx.queue, metrics::DeadLetterReason::Malformed);
    // A sender waiting for the task learns why at once, if the id can be read.
    if let Some((uuid, name)) = readable_id(&delivery.body) {
        store_dead_letter_state(ctx, &uuid, &name, &reason).await;
    }
    settle("dead-letter", delivery.dead_letter(reason)).await;
}

/// The task id (and name, if any) of a message that does not decode as a signature, when its JSON is an
/// object with a non-empty string `UUID`.
fn readable_id(body: &[u8]) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let uuid = value.get("UUID")?.as_str().filter(|u| !u.is_empty())?;
    let name = value.get("Name").and_then(|n| n.as_str()).unwrap_or("");
    Some((uuid.to_owned(), name.to_owned()))
}

/// Stores FAILURE with the reason a task's message is dead-lettered, so that a sender waiting for its
/// result gets that error at once instead of waiting out its timeout. Best effort: the message is
/// dead-lettered whether or not this works.
pub(super) async fn store_dead_letter_state(
    ctx: &WorkerContext,
    uuid: &str,
    name: &str,
    reason: &str,
) {
    let state = TaskState::failure(uuid, name, format!("dead-lettered: {reason}"));
    if let Err(error) = ctx.server.backend().set_state(&state).await {
        tracing::warn!(%error, task.uuid = %uuid, "cannot store the FAILURE state of a dead-lettered task");
    }
}

async fn run_task(
    ctx: &WorkerContext,
    task: &Registered,
    signature: Arc<Signature>,
    delivery: Delivery,
    started: TaskState,
    earlier: Option<Vec<TaskResult>>,
    slot: &mut Slot,
) {
    let def = task.def;
    let delivery = match earlier {
        // Boxed: rate admission is a large future (its sleep, its publish) that most tasks never start,
        // and every run's future would carry its size.
        None if def.options.rate_limit.is_some() => {
            match Box::pin(super::rate::admit(ctx, def, &signature, delivery)).await {
                Some(admitted) => admitted,
                None => return,
            }
        }
        _ => delivery,
    };
    let redelivered = delivery.redelivered;
    let started_at = std::time::Instant::now();
    let outcome = match earlier {
        // Its side effects happened already: only what follows it is sent again.
        Some(results) => Ok(results),
        None => {
            ctx.hooks.pre_task(&signature);
            call::call(ctx, def, signature.clone(), redelivered).await
        }
    };
    let took = started_at.elapsed();
    slot.handler_done().await;
    let (finish, delivery) = match outcome {
        Ok(results) => {
            let state = started.succeeded(results);
            let delivery = if nothing_follows(&signature) {
                // Nothing to send after this task: its SUCCESS and the acknowledgement can travel
                // together (one round trip where the broker and backend share a server).
                match delivery.try_ack_with_state(&state).await {
                    Ok(()) => {
                        done(ctx, task, &signature, &state, took).await;
                        return;
                    }
                    // The same state, stored on its own.
                    Err(delivery) => delivery,
                }
            } else {
                delivery
            };
            (succeeded(ctx, def, &signature, state).await, delivery)
        }
        // Boxed, as the follow-ups above: failures and retries are the rarer road.
        Err(failure) => (
            Box::pin(failed(ctx, def, &signature, failure)).await,
            delivery,
        ),
    };
    match finish {
        Finish::Done(state) => {
            done(ctx, task, &signature, &state, took).await;
            settle("ack", delivery.ack()).await;
        }
        Finish::NotStored => {
            // The outcome could not be stored: leave the task to run again rather than lose it.
            tracing::error!("the outcome could not be stored; the message goes back to the queue");
            settle("requeue", delivery.requeue(signature_body(&signature))).await;
        }
        Finish::FollowUpFailed(state, failed) => {
            done(ctx, task, &signature, &state, took).await;
            Box::pin(follow_up::requeue(ctx, &signature, delivery, failed)).await;
        }
        Finish::Unstorable(error) => {
            // Running the task again would end the same way, for ever: give it up, saying why.
            let reason = format!("the task's final state cannot be stored: {error}");
            tracing::error!(%reason, "dead-lettering a task whose outcome can never be stored; it is not run again");
            tracing::Span::current().record("outcome", "DEAD_LETTERED");
            metrics::dead_lettered(&ctx.queue, metrics::DeadLetterReason::Unstorable);
            store_dead_letter_state(ctx, &signature.uuid, &signature.name, &reason).await;
            settle("dead-letter", delivery.dead_letter(reason)).await;
        }
    }
}

/// How a run ends once its outcome is dealt with.
enum Finish {
    /// The final state is stored and every follow-up sent: acknowledge the message.
    Done(TaskState),
    /// The outcome could not be stored, for a transient reason: put the message back to run again.
    NotStored,
    /// The outcome can never be stored (a [permanent](BackendError::is_permanent) error): dead-letter
    /// the message with the reason, without running the task again.
    Unstorable(BackendError),
    /// The final state is stored but a follow-up could not be sent: put the message back to run again
    /// ([`follow_up::requeue`]).
    FollowUpFailed(TaskState, FollowUpFailed),
}

impl Finish {
    /// The outcome could not be stored: `Unstorable` if the error is permanent, else `NotStored`.
    fn not_stored(error: BackendError) -> Finish {
        if error.is_permanent() {
            Finish::Unstorable(error)
        } else {
            Finish::NotStored
        }
    }

    /// `Done(state)`, or `FollowUpFailed` if sending the follow-ups failed.
    fn after(state: TaskState, sent: Result<(), FollowUpFailed>) -> Finish {
        match sent {
            Ok(()) => Finish::Done(state),
            Err(failed) => Finish::FollowUpFailed(state, failed),
        }
    }
}

/// Whether a successful run of `signature` sends nothing further (no callback, no chord step), so that
/// its final state is the last thing to store before the acknowledgement.
fn nothing_follows(signature: &Signature) -> bool {
    signature.on_success.is_empty()
        && (signature.group_uuid.is_empty() || signature.chord_callback.is_none())
}

/// Records a run whose final state is stored ([`finished`]), and releases a unique task's key once that
/// state is final.
async fn done(
    ctx: &WorkerContext,
    task: &Registered,
    signature: &Signature,
    state: &TaskState,
    took: Duration,
) {
    finished(ctx, task, signature, state, took);
    if state.is_completed() {
        crate::unique::release(ctx.server.backend().as_ref(), signature).await;
    }
}

/// Records a run whose final state is stored: metrics, the span's outcome and the post-task hook.
fn finished(
    ctx: &WorkerContext,
    task: &Registered,
    signature: &Signature,
    state: &TaskState,
    took: Duration,
) {
    let outcome = match state.state {
        State::Success => metrics::Outcome::Succeeded,
        State::Retry => metrics::Outcome::Retried,
        _ => metrics::Outcome::Failed,
    };
    task.metrics.finished(outcome, took);
    ctx.counters.finished(&state.state);
    tracing::Span::current().record("outcome", state.state.as_str());
    log::finished(signature, state, took);
    ctx.hooks.post_task(signature, state);
}

fn signature_body(signature: &Signature) -> Vec<u8> {
    signature.to_json().unwrap_or_default()
}

/// Stores SUCCESS (`state`), sends the callbacks, and fires the chord if this was its group's last
/// member. Results too large for the backend make the task fail with that error (running it again would
/// not help).
async fn succeeded(
    ctx: &WorkerContext,
    def: &'static TaskDef,
    signature: &Signature,
    state: TaskState,
) -> Finish {
    match store_final(ctx, &state).await {
        Ok(()) => {}
        Err(error @ BackendError::TooLarge { .. }) => {
            let message = format!("the task's result cannot be stored: {error}");
            let failure = TaskFailure::new(FailureKind::Encode, message);
            return Box::pin(failed(ctx, def, signature, failure)).await;
        }
        Err(error) => return Finish::not_stored(error),
    }
    tracing::debug!("task succeeded");
    if nothing_follows(signature) {
        return Finish::Done(state);
    }
    // Boxed: sending follow-ups is a large future that most runs never start, and every run's future
    // would otherwise carry its size (it is moved when a batch's runs are gathered).
    let sent = Box::pin(async {
        let results = state.results.as_deref().unwrap_or_default();
        follow_up::send_success_callbacks(ctx, signature, results).await?;
        follow_up::group_member_finished(ctx, signature).await
    })
    .await;
    Finish::after(state, sent)
}

/// Retries the task if it may be retried, else stores FAILURE and sends the error callbacks.
async fn failed(
    ctx: &WorkerContext,
    def: &'static TaskDef,
    signature: &Signature,
    failure: TaskFailure,
) -> Finish {
    if failure.is_retryable() && signature.retry_count > 0 {
        return retry(ctx, def, signature, &failure).await;
    }
    final_failure(ctx, signature, failure).await
}

/// Stores FAILURE and sends the error callbacks: a failure with no retry left.
async fn final_failure(ctx: &WorkerContext, signature: &Signature, failure: TaskFailure) -> Finish {
    let state = TaskState::failure(&signature.uuid, &signature.name, failure.message.clone());
    if let Err(error) = store_final(ctx, &state).await {
        return Finish::not_stored(error);
    }
    tracing::info!(error = %failure.message, kind = ?failure.kind, "task failed");
    ctx.hooks.error(&failure);
    let sent = match follow_up::send_error_callbacks(
        ctx,
        &signature.on_error,
        &failure.message,
        follow_up::came_again(signature),
    )
    .await
    {
        Ok(()) => follow_up::group_member_finished(ctx, signature).await,
        Err(failed) => Err(failed),
    };
    Finish::after(state, sent)
}

/// Go's retry: RETRY state, one retry fewer, and the same message (same id) again with an ETA. The delay
/// is the one the task asked for, else the task's back-off strategy, else the next Fibonacci number of
/// seconds (Go's `RetryTimeout` sequence).
async fn retry(
    ctx: &WorkerContext,
    def: &'static TaskDef,
    signature: &Signature,
    failure: &TaskFailure,
) -> Finish {
    let state = TaskState::retry(&signature.uuid, &signature.name);
    if let Err(error) = store_final(ctx, &state).await {
        return Finish::not_stored(error);
    }
    let attempt = signature
        .header_value(RETRY_ATTEMPT_HEADER)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        .saturating_add(1);
    let mut again = signature.clone().header(RETRY_ATTEMPT_HEADER, attempt);
    // A retry reserves a start of its own.
    if let Some(headers) = again.headers.as_mut() {
        headers.remove(RATE_SLOT_HEADER);
    }
    again.retry_count -= 1;
    let delay = match (failure.retry_after, def.options.backoff) {
        (Some(delay), _) => delay,
        (None, Some(strategy)) => strategy.delay(u32::try_from(attempt).unwrap_or(u32::MAX)),
        (None, None) => {
            again.retry_timeout = fibonacci_next(again.retry_timeout);
            Duration::from_secs(u64::from(again.retry_timeout))
        }
    };
    again.eta =
        Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX));
    tracing::info!(error = %failure.message, retry_in = ?delay, retries_left = again.retry_count, "task failed; retrying");
    match ctx.server.publish(&mut again).await {
        Ok(()) => Finish::Done(state),
        Err(error) if error.is_permanent() => {
            // The broker will never take the retry (headers too large for it, say): the task fails now,
            // saying why, rather than run again and again.
            tracing::error!(%error, "the retry can never be scheduled; the task fails");
            ctx.hooks.error(&error);
            let message = format!(
                "{}; the retry cannot be scheduled: {error}",
                failure.message
            );
            final_failure(ctx, signature, TaskFailure::new(failure.kind, message)).await
        }
        Err(error) => {
            tracing::error!(%error, "cannot schedule the retry");
            ctx.hooks.error(&error);
            Finish::NotStored
        }
    }
}

/// Stores a final state, retrying for a while: acknowledging without it would lose the outcome.
pub(super) async fn store_final(
    ctx: &WorkerContext,
    state: &TaskState,
) -> Result<(), BackendError> {
    let backend = ctx.server.backend();
    let stored = retry_io("store final state", || backend.set_state(state)).await;
    if let Err(error) = &stored {
        tracing::error!(%error, state = %state.state, "cannot store the task's state");
        ctx.hooks.error(error);
        ctx.backend_health
            .failed(error, backend.as_ref(), &ctx.queue)
            .await;
    }
    stored
}

pub(super) async fn retry_io<T, F, Fut>(what: &str, mut op: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut attempts = 0;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            // Retrying cannot help these.
            Err(error) if error.is_permanent() => return Err(error),
            Err(error) if attempts >= 6 => return Err(error),
            Err(error) => {
                attempts += 1;
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "{what} failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

pub(super) async fn settle<F: Future<Output = Result<(), crate::broker::BrokerError>>>(
    what: &str,
    op: F,
) {
    if let Err(error) = op.await {
        tracing::warn!(%error, "cannot {what} the message; the broker will deliver it again");
    }
}
