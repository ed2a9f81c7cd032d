//! The DS the HTTP front serves, in a cell whose content can be replaced
//! (by `recovery`, after a storage failure) while requests keep arriving.

use std::sync::{Arc, RwLock};

/// The current value, or none while it is being rebuilt.
pub(crate) struct StateCell<T> {
    current: RwLock<Option<Arc<T>>>,
}

impl<T> StateCell<T> {
    /// A cell holding `value`.
    pub(crate) fn new(value: Arc<T>) -> Arc<StateCell<T>> {
        Arc::new(StateCell {
            current: RwLock::new(Some(value)),
        })
    }

    /// The value to serve a request with; `None` while reopening.
    pub(crate) fn get(&self) -> Option<Arc<T>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Put `value` in (`None`: being rebuilt); returns what was there.
    pub(crate) fn replace(&self, value: Option<Arc<T>>) -> Option<Arc<T>> {
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            value,
        )
    }
}

/// What requests are told while storage is being reopened.
pub(crate) const REOPENING: &str = "storage is being reopened after a failure; retry shortly";
