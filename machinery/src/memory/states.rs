//! The memory backend's task records, found by the id each record holds: a map keyed by the id would
//! keep a second copy of it, one allocation more for every task stored.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use tokio::time::Instant;

use crate::wire::state::TaskState;

/// A task's record and when it expires.
pub(super) type Record = (TaskState, Instant);

/// Task records by id.
#[derive(Default)]
pub(super) struct States {
    table: HashTable<Record>,
    hasher: foldhash::fast::RandomState,
}

impl States {
    fn hash(&self, uuid: &str) -> u64 {
        self.hasher.hash_one(uuid)
    }

    /// The record of `uuid`, expired or not.
    pub(super) fn get(&self, uuid: &str) -> Option<&Record> {
        self.table
            .find(self.hash(uuid), |(state, _)| state.task_uuid == uuid)
    }

    /// The record of `uuid`, to change in place (its id must stay the same).
    pub(super) fn get_mut(&mut self, uuid: &str) -> Option<&mut Record> {
        let hash = self.hash(uuid);
        self.table
            .find_mut(hash, |(state, _)| state.task_uuid == uuid)
    }

    /// Adds the record of a task that has none.
    pub(super) fn insert_new(&mut self, record: Record) {
        let hash = self.hash(&record.0.task_uuid);
        let hasher = &self.hasher;
        self.table.insert_unique(hash, record, |(state, _)| {
            hasher.hash_one(state.task_uuid.as_str())
        });
    }

    /// Forgets the record of `uuid`.
    pub(super) fn remove(&mut self, uuid: &str) {
        let hash = self.hash(uuid);
        if let Ok(entry) = self
            .table
            .find_entry(hash, |(state, _)| state.task_uuid == uuid)
        {
            entry.remove();
        }
    }

    /// Keeps the records `keep` says to.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Record) -> bool) {
        self.table.retain(|record| keep(record));
    }

    /// How many records there are.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_found_changed_and_removed_by_their_id() {
        let mut states = States::default();
        let now = Instant::now();
        for id in ["a", "b", "c"] {
            states.insert_new((TaskState::pending(id, "add"), now));
        }
        assert_eq!(states.len(), 3);
        assert_eq!(
            states.get("b").map(|(s, _)| s.task_name.as_str()),
            Some("add")
        );
        if let Some((state, _)) = states.get_mut("b") {
            state.task_name = "sum".to_owned();
        }
        assert_eq!(
            states.get("b").map(|(s, _)| s.task_name.as_str()),
            Some("sum")
        );
        states.remove("a");
        assert!(states.get("a").is_none() && states.get("missing").is_none());
        states.retain(|(state, _)| state.task_uuid != "c");
        assert_eq!(states.len(), 1);
    }
}
