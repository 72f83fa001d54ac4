//! Groups and chords on AMQP. Go's AMQP chord bookkeeping is racy (§9.4): it counts messages in a `<group>` queue and relies on an
//! exclusive consumer to elect the chord trigger. Ours is a compare-and-set register made of one message:
//! - `<group>_meta` (durable) holds exactly one message, the group record: Go's `GroupMeta` plus the ids
//!   of the members that have finished and who triggered the chord. [`Backend::init_group`](crate::backend::Backend::init_group) creates it.
//! - A member that finishes takes the record with `basic.get` on a channel in transaction mode, adds
//!   itself (once: a redelivered member is not counted twice), publishes the new record and acknowledges
//!   the old one, and commits: the publish and the ack happen together or not at all. While the record is
//!   taken, other members find the queue empty and try again a moment later; if the holder dies, its
//!   channel closes and RabbitMQ gives the record back. The member whose update completes the group sets
//!   `ChordTriggered` and names itself in the record; it is the only member told to send the callback,
//!   and is told so again on every later call (a retry after a lost answer, a redelivery).
//! - `<group>_states` (durable) is bound to the exchange with every member id, so RabbitMQ files a copy
//!   of each member state there as it is written; the chord's results are read from it, not from the
//!   member queues that result readers may be holding at that moment.

use std::collections::HashMap;
use std::time::Duration;

use futures_core::Stream;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{latest, op_error, Inner, WRITE_DEADLINE};
use crate::amqp::session::{
    self, declare_queue, json_properties, open_channel, short, AmqpError, Mode, QueueSpec,
};
use crate::backend::BackendError;
use crate::wire::state::{GroupMeta, TaskState};

/// How long a group update waits for the record while other members hold it.
const GROUP_DEADLINE: Duration = Duration::from_secs(30);

/// The group record queue of a group.
pub fn group_record_queue(group_uuid: &str) -> String {
    format!("{group_uuid}_meta")
}

/// The queue that collects copies of a group's member states.
pub fn group_states_queue(group_uuid: &str) -> String {
    format!("{group_uuid}_states")
}

/// The group record stored in `<group>_meta`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupRecord {
    #[serde(rename = "Group")]
    meta: GroupMeta,
    #[serde(rename = "FinishedTaskUUIDs", default)]
    finished: Vec<String>,
    #[serde(rename = "TriggeredBy", default)]
    triggered_by: String,
}

impl Inner {
    fn group_queue_spec(&self, with_ttl: bool) -> QueueSpec {
        let mut args = FieldTable::default();
        if with_ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongInt(self.expire_ms));
        }
        args.insert("x-expires".into(), AMQPValue::LongInt(self.expire_ms));
        QueueSpec {
            durable: true,
            auto_delete: false,
            exclusive: false,
            args,
        }
    }

    /// The open transaction channel for group records.
    async fn group_channel(&self, slot: &mut Option<(u64, Channel)>) -> Result<Channel, AmqpError> {
        let live = self.session.live().await?;
        if let Some((generation, channel)) = slot.as_ref() {
            if *generation == live.generation && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let channel = open_channel(&live, Mode::Tx).await?;
        *slot = Some((live.generation, channel.clone()));
        Ok(channel)
    }

    /// One attempt at adding `task` to the group record. `Ok(None)`: the record is held by someone else.
    async fn try_complete(
        &self,
        channel: &Channel,
        group: &str,
        task: &str,
        count: u32,
    ) -> Result<Option<bool>, AmqpError> {
        let queue = group_record_queue(group);
        let got = channel
            .basic_get(
                short("queue name", &queue)?,
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| AmqpError::lapin(format!("taking the group record {queue:?}"), e))?;
        let Some(message) = got else {
            return Ok(None);
        };
        let delivery = message.delivery;
        let mut record: GroupRecord = match serde_json::from_slice(&delivery.data) {
            Ok(record) => record,
            Err(source) => {
                // Not ours to fix: put it back and report.
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
                let _ = channel.tx_commit().await;
                return Err(AmqpError::Json {
                    what: format!("decoding the group record {queue:?}"),
                    source,
                });
            }
        };
        let newly_finished = !record.finished.iter().any(|t| t == task);
        if newly_finished {
            record.finished.push(task.to_owned());
        }
        let complete = record.finished.len() >= count as usize;
        let fires_now = complete && !record.meta.chord_triggered;
        if fires_now {
            record.meta.chord_triggered = true;
            record.triggered_by = task.to_owned();
        }
        // A member that triggered before is told again: this call's earlier attempt, or an earlier call,
        // may have committed with its answer lost (or the message was redelivered), and the member that
        // triggered must still send the callback.
        let won = fires_now || record.triggered_by == task;
        let changed = newly_finished || fires_now;
        if changed {
            let body = serde_json::to_vec(&record).map_err(|source| AmqpError::Json {
                what: format!("encoding the group record {queue:?}"),
                source,
            })?;
            session::send(channel, "", &queue, &body, json_properties())
                .await?
                .confirmed()
                .await?;
            delivery
                .acker
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map_err(|e| AmqpError::lapin("acknowledging the old group record", e))?;
        } else {
            delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map_err(|e| AmqpError::lapin("returning the group record", e))?;
        }
        channel
            .tx_commit()
            .await
            .map_err(|e| AmqpError::lapin(format!("committing the group record {queue:?}"), e))?;
        Ok(Some(won))
    }

    /// Reads every message of a durable queue without consuming it: a consumer with a prefetch of the
    /// queue's size, then the channel is closed and RabbitMQ puts the messages back.
    async fn read_durable_queue(&self, queue: &str) -> Result<Vec<Vec<u8>>, AmqpError> {
        let Some(count) = self.session.ready_count(queue).await? else {
            return Ok(Vec::new());
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let channel = self.session.scratch_channel().await?;
        let result = async {
            let prefetch = u16::try_from(count).unwrap_or(u16::MAX);
            channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(|e| AmqpError::lapin("setting the prefetch", e))?;
            let mut consumer = channel
                .basic_consume(
                    short("queue name", queue)?,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| AmqpError::lapin(format!("reading queue {queue:?}"), e))?;
            let mut bodies = Vec::with_capacity(count as usize);
            let timeout = Duration::from_secs(10);
            while bodies.len() < count as usize {
                let next =
                    std::future::poll_fn(|cx| std::pin::Pin::new(&mut consumer).poll_next(cx));
                match tokio::time::timeout(Duration::from_millis(500), next).await {
                    Ok(Some(Ok(delivery))) => bodies.push(delivery.data),
                    Ok(Some(Err(e))) => {
                        return Err(AmqpError::lapin(format!("reading queue {queue:?}"), e))
                    }
                    Ok(None) => {
                        return Err(AmqpError::ConsumerGone {
                            queue: queue.to_owned(),
                        })
                    }
                    // Fewer than counted: some expired or were taken meanwhile.
                    Err(_) => break,
                }
                if bodies.len() > 100_000 {
                    return Err(AmqpError::Timeout {
                        what: format!("reading queue {queue:?}"),
                        timeout,
                    });
                }
            }
            Ok(bodies)
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        result
    }

    /// Creates the group record in `<group>_meta` and binds `<group>_states` with every member id. Does
    /// nothing if the record exists already.
    pub(super) async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        let record = GroupRecord {
            meta: meta.clone(),
            finished: Vec::new(),
            triggered_by: String::new(),
        };
        let body = serde_json::to_vec(&record).map_err(|source| BackendError::Decode {
            key: meta.group_uuid.clone(),
            source,
        })?;
        let states_queue = group_states_queue(&meta.group_uuid);
        let record_queue = group_record_queue(&meta.group_uuid);
        session::retry_transient(
            "creating a group",
            Instant::now() + WRITE_DEADLINE,
            || async {
                let live = self.session.live().await?;
                // Its own channel: the binds are sent without waiting for each answer, and a failure would
                // close the channel under anyone else's feet.
                let channel = open_channel(&live, Mode::Confirm).await?;
                let result = async {
                    self.ensure_exchange(&live, &channel).await?;
                    if !self.exchange.is_empty() {
                        declare_queue(&channel, &states_queue, &self.group_queue_spec(true))
                            .await?;
                        let queue = short("queue name", &states_queue)?;
                        let exchange = short("exchange name", &self.exchange)?;
                        for uuid in &meta.task_uuids {
                            channel
                                .queue_bind(
                                    queue.clone(),
                                    exchange.clone(),
                                    short("binding key", uuid)?,
                                    QueueBindOptions { nowait: true },
                                    FieldTable::default(),
                                )
                                .await
                                .map_err(|e| {
                                    AmqpError::lapin("binding the group states queue", e)
                                })?;
                        }
                    }
                    // A synchronous method after the nowait binds: if one failed, the channel is closed and
                    // this fails.
                    let ready =
                        declare_queue(&channel, &record_queue, &self.group_queue_spec(false))
                            .await?;
                    if ready == 0 {
                        session::send(&channel, "", &record_queue, &body, json_properties())
                            .await?
                            .confirmed()
                            .await?;
                    }
                    Ok(())
                }
                .await;
                let _ = channel.close(200, "OK".into()).await;
                result
            },
        )
        .await
        .map_err(op_error("init group"))
    }

    pub(super) async fn get_group(
        &self,
        group_uuid: &str,
    ) -> Result<Option<GroupMeta>, BackendError> {
        let queue = group_record_queue(group_uuid);
        if self
            .session
            .ready_count(&queue)
            .await
            .map_err(op_error("get group"))?
            .is_none()
        {
            return Ok(None);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        loop {
            let bodies =
                session::retry_transient("reading a group", deadline, || self.peek_all(&queue))
                    .await
                    .map_err(op_error("get group"))?;
            if let Some(body) = bodies.last() {
                let record: GroupRecord =
                    serde_json::from_slice(body).map_err(|source| BackendError::Decode {
                        key: queue.clone(),
                        source,
                    })?;
                return Ok(Some(record.meta));
            }
            // Taken by a member updating it: it comes back in a moment.
            if Instant::now() >= deadline {
                return Err(BackendError::operation(
                    "get group",
                    AmqpError::Timeout {
                        what: format!(
                            "waiting for the group record {queue:?} held by another process"
                        ),
                        timeout: Duration::from_secs(5),
                    },
                ));
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The members' states from `<group>_states` (the newest SUCCESS or FAILURE of each), in group order;
    /// a member with no copy there is read from its own queue.
    pub(super) async fn group_states(
        &self,
        meta: &GroupMeta,
    ) -> Result<Vec<TaskState>, BackendError> {
        let queue = group_states_queue(&meta.group_uuid);
        let bodies = session::retry_transient(
            "reading group states",
            Instant::now() + Duration::from_secs(10),
            || self.read_durable_queue(&queue),
        )
        .await
        .map_err(op_error("group states"))?;
        let mut by_task: HashMap<String, Vec<TaskState>> = HashMap::new();
        for body in bodies {
            let state = TaskState::from_json(&body).map_err(|source| BackendError::Decode {
                key: queue.clone(),
                source,
            })?;
            by_task
                .entry(state.task_uuid.clone())
                .or_default()
                .push(state);
        }
        let mut states = Vec::with_capacity(meta.task_uuids.len());
        for uuid in &meta.task_uuids {
            let state = match by_task.remove(uuid).and_then(latest) {
                Some(state) => Some(state),
                None => self.read_state(uuid).await?,
            };
            states.extend(state);
        }
        Ok(states)
    }

    /// See the module docs: a transactional take-update-put of the group record.
    pub(super) async fn complete_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError> {
        let deadline = Instant::now() + GROUP_DEADLINE;
        let mut slot = self.group.lock().await;
        let mut held_backoff =
            crate::retry::Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        let mut error_backoff =
            crate::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let attempt = async {
                let channel = self.group_channel(&mut slot).await?;
                self.try_complete(&channel, group_uuid, task_uuid, group_task_count)
                    .await
            }
            .await;
            match attempt {
                Ok(Some(won)) => return Ok(won),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(held_backoff.next_delay()).await;
                }
                Err(error) if error.soft_error() == Some(AMQPSoftError::NOTFOUND) => {
                    return Err(BackendError::UnknownGroup(group_uuid.to_owned()));
                }
                Err(error) if error.is_transient() && Instant::now() < deadline => {
                    // The commit may or may not have happened; the record will tell on the next try.
                    tokio::time::sleep(error_backoff.next_delay()).await;
                }
                Ok(None) => {
                    return Err(BackendError::operation(
                        "complete group member",
                        AmqpError::Timeout {
                            what: format!(
                                "taking the record of group {group_uuid} (held by other workers)"
                            ),
                            timeout: GROUP_DEADLINE,
                        },
                    ))
                }
                Err(error) => return Err(op_error("complete group member")(error)),
            }
        }
    }

    pub(super) async fn purge_group(&self, group_uuid: &str) -> Result<(), BackendError> {
        session::retry_transient(
            "deleting a group",
            Instant::now() + WRITE_DEADLINE,
            || async {
                self.delete_queue(&group_record_queue(group_uuid)).await?;
                self.delete_queue(&group_states_queue(group_uuid)).await
            },
        )
        .await
        .map_err(op_error("purge group"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_record_keeps_go_group_meta_inside() {
        let record = GroupRecord {
            meta: GroupMeta::new("group_1", vec!["task_a".into(), "task_b".into()]),
            finished: vec!["task_a".into()],
            triggered_by: String::new(),
        };
        let json: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(json["Group"]["TaskUUIDs"][1], "task_b");
        assert_eq!(json["FinishedTaskUUIDs"][0], "task_a");
        let back: GroupRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.meta, record.meta);
    }
}
