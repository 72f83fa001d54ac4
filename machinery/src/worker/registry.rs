//! The table of tasks a worker runs, keyed by wire name.

use foldhash::HashMap;

use super::WorkerError;
use crate::task::TaskDef;

/// The tasks of one worker.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    tasks: HashMap<&'static str, &'static TaskDef>,
}

impl Registry {
    /// Builds the table; two different tasks with one wire name are an error naming both.
    pub(crate) fn build(defs: &[&'static TaskDef]) -> Result<Registry, WorkerError> {
        let mut tasks: HashMap<&'static str, &'static TaskDef> =
            HashMap::with_capacity_and_hasher(defs.len(), Default::default());
        for def in defs {
            match tasks.get(def.name) {
                // The same definition registered twice (say by `auto` and by `register`) is harmless.
                Some(existing) if std::ptr::eq(*existing, *def) => {}
                Some(existing) => {
                    let (first, second) = if existing.rust_path <= def.rust_path {
                        (existing.rust_path, def.rust_path)
                    } else {
                        (def.rust_path, existing.rust_path)
                    };
                    return Err(WorkerError::DuplicateTask {
                        name: def.name.to_owned(),
                        first: first.to_owned(),
                        second: second.to_owned(),
                    });
                }
                None => {
                    tasks.insert(def.name, def);
                }
            }
        }
        Ok(Registry { tasks })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&'static TaskDef> {
        self.tasks.get(name).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.tasks.len()
    }

    /// The names, sorted, for logs.
    pub(crate) fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.tasks.keys().copied().collect();
        names.sort_unstable();
        names
    }
}
