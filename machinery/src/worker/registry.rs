//! The table of tasks a worker runs, keyed by wire name.

use foldhash::HashMap;

use super::WorkerError;
use crate::task::TaskDef;
use crate::telemetry::metrics::TaskMetrics;

/// The tasks of one worker, each with its metrics handles.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    tasks: HashMap<&'static str, Registered>,
}

/// A task of the worker.
#[derive(Debug)]
pub(crate) struct Registered {
    pub(crate) def: &'static TaskDef,
    pub(crate) metrics: TaskMetrics,
}

impl Registry {
    /// Builds the table; two different tasks with one wire name are an error naming both.
    pub(crate) fn build(defs: &[&'static TaskDef]) -> Result<Registry, WorkerError> {
        let mut tasks: HashMap<&'static str, Registered> =
            HashMap::with_capacity_and_hasher(defs.len(), Default::default());
        for def in defs {
            match tasks.get(def.name).map(|registered| registered.def) {
                // The same definition registered twice (say by `auto` and by `register`) is harmless.
                Some(existing) if std::ptr::eq(existing, *def) => {}
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
                    let metrics = TaskMetrics::register(def.name);
                    tasks.insert(def.name, Registered { def, metrics });
                }
            }
        }
        Ok(Registry { tasks })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Registered> {
        self.tasks.get(name)
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
