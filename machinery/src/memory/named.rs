//! In-process instances shared by name: `memory://name` gives every server of the process that names it
//! the same in-memory broker (or backend), while `memory://` gives a private one.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

type Registry = Mutex<HashMap<(TypeId, String), Weak<dyn Any + Send + Sync>>>;

/// The name in `url` (`memory://name` → `name`, `memory://` → empty), and the instance of `T` for it: a new
/// private one for an empty name, else the one other callers got for that name while it lives.
pub(crate) fn instance<T: Default + Send + Sync + 'static>(url: &str) -> (String, Arc<T>) {
    let name = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .trim_matches('/')
        .to_owned();
    if name.is_empty() {
        return (name, Arc::new(T::default()));
    }
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    let mut registry = REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.retain(|_, weak| weak.strong_count() > 0);
    let key = (TypeId::of::<T>(), name.clone());
    if let Some(existing) = registry.get(&key).and_then(Weak::upgrade) {
        if let Ok(shared) = existing.downcast::<T>() {
            return (name, shared);
        }
    }
    let shared = Arc::new(T::default());
    let erased: Arc<dyn Any + Send + Sync> = shared.clone();
    registry.insert(key, Arc::downgrade(&erased));
    (name, shared)
}
