//! Per-cycle scratch space shared by the plugins of one scheduling cycle.

use std::any::Any;
use std::collections::HashMap;

/// A typed map keyed by plugin name: a pre-filter or pre-score plugin computes something once
/// per cycle and its filter or score reads it for every node.
#[derive(Default)]
pub struct CycleState {
    values: HashMap<&'static str, Box<dyn Any + Send + Sync>>,
}

impl CycleState {
    /// Stores `value` under `plugin`, replacing what was there.
    pub fn write<T: Any + Send + Sync>(&mut self, plugin: &'static str, value: T) {
        self.values.insert(plugin, Box::new(value));
    }

    /// Reads the value `plugin` stored, if it has the type asked for.
    pub fn read<T: Any + Send + Sync>(&self, plugin: &'static str) -> Option<&T> {
        self.values.get(plugin)?.downcast_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_and_keyed_by_plugin() {
        let mut state = CycleState::default();
        state.write("A", 7u64);
        assert_eq!(state.read::<u64>("A"), Some(&7));
        assert_eq!(state.read::<i32>("A"), None);
        assert_eq!(state.read::<u64>("B"), None);
    }
}
