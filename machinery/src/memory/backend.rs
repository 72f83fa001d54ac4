//! The in-process result backend (`memory://`), the default. Like the memory broker, `memory://name` is
//! shared by every server of the process that names it, and `memory://` is private to one server.
//! Records expire after `results_expire_in` seconds; waiting for a result is woken by the write itself.

use foldhash::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::states::States;
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::wire::state::{GroupMeta, TaskState};

/// The in-process result backend.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
    expire_in: Duration,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("expire_in", &self.expire_in)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    records: Mutex<Records>,
    changed: Notify,
}

#[derive(Default)]
struct Records {
    states: States,
    groups: HashMap<String, (GroupMeta, Instant)>,
    finished_members: HashMap<String, HashSet<String>>,
    /// The member whose call completed each group (told `true` again when it calls again).
    chord_winners: HashMap<String, String>,
    /// Unique-task keys: the holder's id, and when the claim lapses.
    unique: HashMap<String, (String, Instant)>,
    writes: u64,
}

/// The fewest writes between two sweeps of expired records.
const SWEEP_AFTER_WRITES: u64 = 1024;

impl Records {
    /// Drops expired records every so often, so a long-running process does not grow without bound.
    fn sweep(&mut self, now: Instant) {
        self.writes += 1;
        // A sweep walks every record, so it waits for at least as many writes as there are records: its
        // cost per write stays the same however many records are live (every 1024 writes, it grew with
        // them).
        if self.writes < SWEEP_AFTER_WRITES.max(self.states.len() as u64) {
            return;
        }
        self.writes = 0;
        self.states.retain(|(_, expires)| *expires > now);
        self.groups.retain(|_, (_, expires)| *expires > now);
        let groups = &self.groups;
        self.finished_members
            .retain(|group, _| groups.contains_key(group));
        self.chord_winners
            .retain(|group, _| groups.contains_key(group));
        self.unique.retain(|_, (_, until)| *until > now);
    }
}

impl Records {
    /// The live record of `uuid`, borrowed.
    fn live(&self, uuid: &str, now: Instant) -> Option<&TaskState> {
        self.states
            .get(uuid)
            .filter(|(_, expires)| *expires > now)
            .map(|(state, _)| state)
    }

    /// Stores `state`, keeping the task name and creation time of the live record it replaces. The live
    /// record is overwritten field by field, reusing its strings, so a state change allocates nothing
    /// for the id and the name (a task's five writes would otherwise copy both five times).
    fn store(&mut self, state: &TaskState, now: Instant, expire_in: Duration) {
        match self.states.get_mut(&state.task_uuid) {
            Some((record, expires)) if *expires > now => {
                if !state.task_name.is_empty() {
                    record.task_name.clone_from(&state.task_name);
                }
                if state.created_at != crate::wire::gotime::zero_time() {
                    record.created_at = state.created_at;
                }
                record.state = state.state.clone();
                record.results.clone_from(&state.results);
                record.error.clone_from(&state.error);
                record.ttl = state.ttl;
                record.progress.clone_from(&state.progress);
                *expires = now + expire_in;
            }
            Some((record, expires)) => {
                record.clone_from(state);
                *expires = now + expire_in;
            }
            None => self.states.insert_new((state.clone(), now + expire_in)),
        }
        self.sweep(now);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MemoryBackend {
    /// A backend for `memory://` (private) or `memory://name` (shared by name in this process).
    pub fn connect(url: &str, config: &Config) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new(
            url,
            Duration::from_secs(config.results_expire_in_secs()),
        ))
    }

    /// Creates or joins the instance named by `url`; records expire after `expire_in`.
    pub fn new(url: &str, expire_in: Duration) -> Self {
        let (_, shared) = super::named::instance::<Shared>(url);
        MemoryBackend { shared, expire_in }
    }

    /// Stores `states` under one lock, then wakes the waiters.
    fn store_all(&self, states: &[TaskState]) {
        let now = Instant::now();
        {
            let mut records = self.shared.lock();
            for state in states {
                records.store(state, now, self.expire_in);
            }
        }
        self.shared.changed.notify_waiters();
    }

    fn live_state(records: &Records, uuid: &str, now: Instant) -> Option<TaskState> {
        records
            .states
            .get(uuid)
            .filter(|(_, expires)| *expires > now)
            .map(|(state, _)| state.clone())
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn set_state(&self, state: &TaskState) -> Result<(), BackendError> {
        // Not through `set_states`: each trait call boxes its future.
        self.store_all(std::slice::from_ref(state));
        Ok(())
    }

    async fn set_states(&self, states: &[TaskState]) -> Result<(), BackendError> {
        self.store_all(states);
        Ok(())
    }

    async fn set_received(&self, state: &TaskState) -> Result<bool, BackendError> {
        let now = Instant::now();
        {
            let mut records = self.shared.lock();
            if records
                .live(&state.task_uuid, now)
                .is_some_and(TaskState::stops_a_start)
            {
                return Ok(false);
            }
            records.store(state, now, self.expire_in);
        }
        self.shared.changed.notify_waiters();
        Ok(true)
    }

    /// The whole batch under one lock: each STARTED is stored unless its record stops a start (its
    /// RECEIVED, stored under the same lock, could never be seen).
    async fn set_started_many(&self, started: &[TaskState]) -> Vec<Result<bool, BackendError>> {
        let now = Instant::now();
        let stored = {
            let mut records = self.shared.lock();
            started
                .iter()
                .map(|state| {
                    if records
                        .live(&state.task_uuid, now)
                        .is_some_and(TaskState::stops_a_start)
                    {
                        return Ok(false);
                    }
                    records.store(state, now, self.expire_in);
                    Ok(true)
                })
                .collect()
        };
        self.shared.changed.notify_waiters();
        stored
    }

    async fn claim_unique(
        &self,
        key: &str,
        task_uuid: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BackendError> {
        let now = Instant::now();
        let mut records = self.shared.lock();
        match records.unique.get(key) {
            Some((holder, until)) if *until > now && holder != task_uuid => {
                Ok(Some(holder.clone()))
            }
            _ => {
                let until = now.checked_add(ttl).unwrap_or(now + self.expire_in);
                records
                    .unique
                    .insert(key.to_owned(), (task_uuid.to_owned(), until));
                Ok(None)
            }
        }
    }

    async fn release_unique(&self, key: &str, task_uuid: &str) -> Result<(), BackendError> {
        let mut records = self.shared.lock();
        if records
            .unique
            .get(key)
            .is_some_and(|(holder, _)| holder == task_uuid)
        {
            records.unique.remove(key);
        }
        Ok(())
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>, BackendError> {
        Ok(Self::live_state(
            &self.shared.lock(),
            task_uuid,
            Instant::now(),
        ))
    }

    async fn wait_for_completion(
        &self,
        task_uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let state = Self::live_state(&self.shared.lock(), task_uuid, Instant::now());
            if state.as_ref().is_some_and(TaskState::is_completed) {
                return Ok(state);
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(state),
            }
        }
    }

    async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        let now = Instant::now();
        let mut records = self.shared.lock();
        records.groups.insert(
            meta.group_uuid.clone(),
            (meta.clone(), now + self.expire_in),
        );
        records.sweep(now);
        Ok(())
    }

    async fn get_group(&self, group_uuid: &str) -> Result<Option<GroupMeta>, BackendError> {
        let now = Instant::now();
        Ok(self
            .shared
            .lock()
            .groups
            .get(group_uuid)
            .filter(|(_, expires)| *expires > now)
            .map(|(meta, _)| meta.clone()))
    }

    async fn complete_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError> {
        let mut records = self.shared.lock();
        if records.chord_winners.get(group_uuid).map(String::as_str) == Some(task_uuid) {
            return Ok(true);
        }
        let finished = records
            .finished_members
            .entry(group_uuid.to_owned())
            .or_default();
        finished.insert(task_uuid.to_owned());
        if finished.len() < group_task_count as usize {
            return Ok(false);
        }
        let Some((meta, _)) = records.groups.get_mut(group_uuid) else {
            return Err(BackendError::UnknownGroup(group_uuid.to_owned()));
        };
        if meta.chord_triggered {
            return Ok(false);
        }
        meta.chord_triggered = true;
        records
            .chord_winners
            .insert(group_uuid.to_owned(), task_uuid.to_owned());
        Ok(true)
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<(), BackendError> {
        self.shared.lock().states.remove(task_uuid);
        Ok(())
    }

    async fn purge_group(&self, group_uuid: &str) -> Result<(), BackendError> {
        let mut records = self.shared.lock();
        records.groups.remove(group_uuid);
        records.finished_members.remove(group_uuid);
        records.chord_winners.remove(group_uuid);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::state::State;

    #[tokio::test]
    async fn states_merge_and_expire() {
        let backend = MemoryBackend::new("memory://", Duration::from_millis(50));
        backend
            .set_state(&TaskState::pending("t1", "add"))
            .await
            .unwrap();
        backend
            .set_state(&TaskState::started("t1", ""))
            .await
            .unwrap();
        let state = backend.get_state("t1").await.unwrap().unwrap();
        assert_eq!(state.task_name, "add");
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(backend.get_state("t1").await.unwrap().is_none());
    }

    #[test]
    fn expired_records_go_within_as_many_writes_as_there_are_records() {
        let mut records = Records::default();
        let start = Instant::now();
        for i in 0..3000 {
            let state = TaskState::pending(&format!("t{i}"), "add");
            records.store(&state, start, Duration::from_millis(1));
        }
        let later = start + Duration::from_secs(1);
        let fresh = TaskState::pending("fresh", "add");
        let writes = (1..=3001)
            .find(|_| {
                records.store(&fresh, later, Duration::from_secs(60));
                records.states.len() == 1
            })
            .expect("the expired records are swept");
        assert!(writes > 1, "not at every write");
        assert!(records.live("fresh", later).is_some());
    }

    #[tokio::test]
    async fn a_start_never_replaces_a_revocation_or_a_success() {
        let backend = MemoryBackend::new("memory://", Duration::from_secs(60));
        let done = TaskState::success("done", "add", vec![]);
        backend.set_state(&done).await.unwrap();
        backend
            .set_state(&TaskState::revoked("revoked"))
            .await
            .unwrap();
        let started: Vec<_> = ["done", "revoked", "new"]
            .into_iter()
            .map(|id| TaskState::started(id, "add"))
            .collect();
        let answers: Vec<bool> = backend
            .set_started_many(&started)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(answers, [false, false, true]);
        assert!(!backend
            .set_received(&TaskState::received("done", "add"))
            .await
            .unwrap());
        let kept = backend.get_state("done").await.unwrap().unwrap();
        assert_eq!(kept.state, State::Success);
        assert!(backend
            .get_state("revoked")
            .await
            .unwrap()
            .unwrap()
            .is_revoked());
    }

    #[tokio::test]
    async fn waiting_is_woken_by_the_final_write() {
        let backend = MemoryBackend::new("memory://", Duration::from_secs(60));
        let writer = backend.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer
                .set_state(&TaskState::success("t", "x", vec![]))
                .await
                .unwrap();
        });
        let state = backend
            .wait_for_completion("t", Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(state.is_completed());
        task.await.unwrap();
        let missing = backend
            .wait_for_completion("nope", Duration::from_millis(10))
            .await
            .unwrap();
        assert!(missing.is_none());
    }

    #[tokio::test]
    async fn group_completion_fires_once_and_counts_members_once() {
        let backend = MemoryBackend::new("memory://", Duration::from_secs(60));
        backend
            .init_group(&GroupMeta::new("g", vec!["a".into(), "b".into()]))
            .await
            .unwrap();
        assert!(!backend.complete_group_member("g", "a", 2).await.unwrap());
        assert!(!backend.complete_group_member("g", "a", 2).await.unwrap());
        assert!(backend.complete_group_member("g", "b", 2).await.unwrap());
        // The winner calling again (its answer was lost) is told again; the other member is not.
        assert!(backend.complete_group_member("g", "b", 2).await.unwrap());
        assert!(!backend.complete_group_member("g", "a", 2).await.unwrap());
        assert!(
            backend
                .get_group("g")
                .await
                .unwrap()
                .unwrap()
                .chord_triggered
        );
    }
}
