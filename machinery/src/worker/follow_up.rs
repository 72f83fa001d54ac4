//! What a finished task sends on: `OnSuccess` callbacks (how chains advance), `OnError` callbacks, and a
//! chord's callback when the last member of its group finishes; and what happens when one of them
//! cannot be published.
//!
//! A follow-up that cannot be published is never acknowledged away (the chain would end silently): the
//! message is put back, after a short pause that grows with each attempt (counted in
//! [`FOLLOW_UP_ATTEMPTS_HEADER`], logged at WARN), and **the task runs again**. Delivery is
//! at-least-once: follow-ups that were published before the failing one are sent again by the next run,
//! so a callback may run twice. A group member that had completed its chord carries
//! [`CHORD_ELECTED_HEADER`] into its next run, which sends the chord callback without asking the backend
//! again.

use std::time::Duration;

use super::process::{settle, store_final, WorkerContext};
use crate::broker::Delivery;
use crate::error::SendError;
use crate::wire::signature::{
    Arg, Signature, CHORD_ELECTED_HEADER, FOLLOW_UP_ATTEMPTS_HEADER, SENT_AGAIN_HEADER,
};
use crate::wire::state::{State, TaskResult, TaskState};

/// A follow-up that could not be published.
#[derive(Debug)]
pub(super) struct FollowUpFailed {
    /// What it was (`OnSuccess callback`, `chord callback`, ...).
    what: &'static str,
    /// The follow-up task's name.
    callback: String,
    error: SendError,
    /// This member completed its chord before the callback failed.
    chord_elected: bool,
}

/// Sends each `OnSuccess` callback with `results` appended (unless the task is immutable).
pub(super) async fn send_success_callbacks(
    ctx: &WorkerContext,
    signature: &Signature,
    results: &[TaskResult],
) -> Result<(), FollowUpFailed> {
    for callback in &signature.on_success {
        let mut callback = callback.clone();
        if !signature.immutable {
            callback.args.extend(results.iter().map(result_arg));
        }
        send_follow_up(
            ctx,
            "OnSuccess callback",
            came_again(signature),
            &mut callback,
        )
        .await?;
    }
    Ok(())
}

/// Sends `OnError` callbacks with the error text prepended as a `string` argument, as Go does. `again`:
/// the failed task's message came more than once ([`came_again`]).
pub(super) async fn send_error_callbacks(
    ctx: &WorkerContext,
    callbacks: &[Signature],
    error: &str,
    again: bool,
) -> Result<(), FollowUpFailed> {
    for callback in callbacks {
        let mut callback = callback.clone();
        callback
            .args
            .insert(0, Arg::new("", "string", error.into()));
        send_follow_up(ctx, "OnError callback", again, &mut callback).await?;
    }
    Ok(())
}

/// Whether this message may have come before: it was redelivered ([`mark_if_redelivered`]), found
/// to be a copy of a task whose SUCCESS is stored ([`mark_sent_again`]), put back because a follow-up
/// could not be sent ([`FOLLOW_UP_ATTEMPTS_HEADER`]), or it is a follow-up sent again by such a message
/// ([`SENT_AGAIN_HEADER`]).
pub(super) fn came_again(signature: &Signature) -> bool {
    signature.header_value(SENT_AGAIN_HEADER).is_some()
        || signature.header_value(FOLLOW_UP_ATTEMPTS_HEADER).is_some()
}

/// Marks a redelivered message ([`SENT_AGAIN_HEADER`]) so that the follow-ups it sends are marked too: a
/// copy of a message whose task succeeded is not run again ([`super::start`]), and its follow-ups must
/// not store PENDING over states that may be further along.
pub(super) fn mark_if_redelivered(signature: &mut Signature, delivery: &Delivery) {
    if delivery.redelivered {
        mark_sent_again(signature);
    }
}

/// Marks a message as one that may have come before ([`came_again`]), unless it is marked already.
pub(super) fn mark_sent_again(signature: &mut Signature) {
    if !came_again(signature) {
        signature
            .headers
            .get_or_insert_with(Default::default)
            .insert(SENT_AGAIN_HEADER.to_owned(), true.into());
    }
}

/// Whether `signature` is a chord member (in a group, with a chord callback): only those are checked by
/// [`impossible_chord_member`].
pub(super) fn is_chord_member(signature: &Signature) -> bool {
    !signature.group_uuid.is_empty() && signature.chord_callback.is_some()
}

/// Why a chord member can never complete its chord correctly, if it cannot (Go's rule: a chord fires
/// only when every member listed in the group record has finished). The trigger counts members up to the
/// message's `GroupTaskCount`, so a count of 0 (negative counts read as 0), or one that differs from the
/// group record's list, or a member the record does not list, would fire the callback early, with
/// results missing. Such a member is dead-lettered before it runs. One read of the group record per chord
/// member; a record that cannot be read leaves the decision to the trigger, as before.
pub(super) async fn impossible_chord_member(
    ctx: &WorkerContext,
    signature: &Signature,
) -> Option<String> {
    if !is_chord_member(signature) {
        return None;
    }
    let member = |why: String| {
        format!(
            "chord member {} of group {}: {why}; the chord callback could never get every member's result",
            signature.uuid, signature.group_uuid
        )
    };
    if signature.group_task_count == 0 {
        return Some(member("GroupTaskCount is 0 (or negative)".to_owned()));
    }
    let meta = match ctx.server.backend().get_group(&signature.group_uuid).await {
        Ok(Some(meta)) => meta,
        _ => return None,
    };
    if meta.task_uuids.len() != signature.group_task_count as usize {
        return Some(member(format!(
            "GroupTaskCount is {}, but the group record lists {} members",
            signature.group_task_count,
            meta.task_uuids.len()
        )));
    }
    if !meta.task_uuids.contains(&signature.uuid) {
        return Some(member("the group record does not list it".to_owned()));
    }
    None
}

/// A group member finished: if it was the last, and the group is a chord, send the callback with the
/// members' results in group order.
pub(super) async fn group_member_finished(
    ctx: &WorkerContext,
    signature: &Signature,
) -> Result<(), FollowUpFailed> {
    let backend = ctx.server.backend();
    if signature.group_uuid.is_empty() {
        return Ok(());
    }
    let Some(callback) = &signature.chord_callback else {
        return Ok(());
    };
    let elected_before = signature
        .header_value(CHORD_ELECTED_HEADER)
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if !elected_before {
        let fire = super::process::retry_io("complete group member", || {
            backend.complete_group_member(
                &signature.group_uuid,
                &signature.uuid,
                signature.group_task_count,
            )
        })
        .await;
        match fire {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(error) => {
                tracing::error!(%error, group = %signature.group_uuid, "cannot record chord progress; the chord callback may not fire");
                ctx.hooks.error(&error);
                return Ok(());
            }
        }
    }
    let elected = |mut failed: FollowUpFailed| {
        failed.chord_elected = true;
        failed
    };
    let states = match backend.group_states(&signature.group_uuid).await {
        Ok(states) => states,
        Err(error) => {
            tracing::error!(%error, group = %signature.group_uuid, "cannot read the group's states; the chord callback is not sent");
            ctx.hooks.error(&error);
            return Ok(());
        }
    };
    if let Some((index, failed)) = states
        .iter()
        .enumerate()
        .find(|(_, s)| s.state != State::Success)
    {
        // Go never fires such a chord and never tells; we fail the callback, so that its result says why,
        // and run its error callbacks.
        let error = format!(
            "chord callback {} not run: group member {index} ({}) failed: {}",
            callback.name, failed.task_uuid, failed.error
        );
        tracing::warn!(group = %signature.group_uuid, member = %failed.task_uuid, %error, "a chord member failed");
        if !callback.uuid.is_empty() {
            let state = TaskState::failure(&callback.uuid, &callback.name, error.clone());
            if store_final(ctx, &state).await.is_err() {
                return Ok(());
            }
        }
        return send_error_callbacks(ctx, &callback.on_error, &error, came_again(signature))
            .await
            .map_err(elected);
    }
    let mut callback = (**callback).clone();
    if !callback.immutable {
        for state in &states {
            callback
                .args
                .extend(state.results.iter().flatten().map(result_arg));
        }
    }
    send_follow_up(ctx, "chord callback", came_again(signature), &mut callback)
        .await
        .map_err(elected)
}

fn result_arg(result: &TaskResult) -> Arg {
    Arg::new("", result.type_tag.clone(), result.value.clone())
}

/// Publishes one follow-up, marked [`SENT_AGAIN_HEADER`] when its task's message came `again`.
async fn send_follow_up(
    ctx: &WorkerContext,
    what: &'static str,
    again: bool,
    signature: &mut Signature,
) -> Result<(), FollowUpFailed> {
    if again {
        signature
            .headers
            .get_or_insert_with(Default::default)
            .insert(SENT_AGAIN_HEADER.to_owned(), true.into());
    }
    ctx.server
        .publish(signature)
        .await
        .map_err(|error| FollowUpFailed {
            what,
            callback: signature.name.clone(),
            error,
            chord_elected: false,
        })
}

/// The longest pause before a message whose follow-up failed is put back.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Puts the message back so that the task runs again and its follow-ups are sent again, after a pause
/// of 100 ms doubling with each attempt (up to 5 s), so that a broker that refuses publishes is not
/// hammered.
pub(super) async fn requeue(
    ctx: &WorkerContext,
    signature: &Signature,
    delivery: Delivery,
    failed: FollowUpFailed,
) {
    let attempt = signature
        .header_value(FOLLOW_UP_ATTEMPTS_HEADER)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        .saturating_add(1);
    let pause = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(16).saturating_sub(1))
        .min(MAX_PAUSE);
    let FollowUpFailed {
        what,
        callback,
        error,
        chord_elected,
    } = failed;
    if error.is_permanent() {
        // The broker refuses this follow-up for good: running the task again would send it again, and
        // be refused again, for ever. Give the message up, saying why.
        let reason = format!("the {what} {callback} can never be sent: {error}");
        tracing::error!(%reason, "dead-lettering a task whose follow-up the broker refuses for good");
        ctx.hooks.error(&error);
        settle("dead-letter", delivery.dead_letter(reason)).await;
        return;
    }
    tracing::warn!(%error, callback = %callback, attempt, retry_in = ?pause, "cannot send the {what}; the message goes back to the queue and the task runs again (at-least-once: follow-ups may be sent twice)");
    ctx.hooks.error(&error);
    let mut again = signature.clone().header(FOLLOW_UP_ATTEMPTS_HEADER, attempt);
    if chord_elected {
        again = again.header(CHORD_ELECTED_HEADER, true);
    }
    tokio::time::sleep(pause).await;
    // Encoding a decoded signature cannot fail; if it did, the message as it came is the next best.
    let body = again.to_json().unwrap_or_else(|_| delivery.body.clone());
    settle("requeue", delivery.requeue(body)).await;
}
