//! Module bytes: the checks the control plane and the agent run on an uploaded module before
//! any compiler sees it (header, size and digest, which WebAssembly features it uses) answer
//! every input, and the features they find are the ones the module needs.

use std::path::Path;

use flotilla_model::module::{check_header, is_component, verify};
use flotilla_model::wasm::{FeatureSet, required_features};
use proptest::prelude::*;

/// The committed example guests: core modules and components, with and without GC.
fn seeds() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests");
    let mut seeds: Vec<Vec<u8>> = ["hello.wasm", "gc.wasm", "hello-c.wasm", "http/echo.wasm"]
        .iter()
        .map(|name| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect();
    seeds.sort();
    seeds
}

/// A seed with a few bytes overwritten, inserted or cut: still mostly well-formed, so the
/// validator goes deep before it fails.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds();
    (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    )
        .prop_map(move |(seed, edits)| {
            let mut bytes = seeds[seed].clone();
            for (at, byte, kind) in edits {
                let i = at.index(bytes.len().max(1));
                match kind {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i.min(bytes.len()), byte),
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            bytes
        })
}

/// Checks one input the way the control plane does at push and the agent before compiling.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let _ = verify(bytes, 1 << 20, None);
    let _ = is_component(bytes);
    if check_header(bytes).is_err() {
        return Ok(());
    }
    if let Ok(required) = required_features(bytes) {
        // Enabling what was found is enough to validate the module...
        let mut validator = wasmparser::Validator::new_with_features(required.validator_features());
        prop_assert!(validator.validate_all(bytes).is_ok(), "{required}");
        // ...and every feature found is needed: without it, the module is invalid.
        for feature in required.iter() {
            let fewer = required.without(FeatureSet::NONE.with(feature));
            let mut validator =
                wasmparser::Validator::new_with_features(fewer.validator_features());
            prop_assert!(
                validator.validate_all(bytes).is_err(),
                "{feature} not needed"
            );
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_bytes_are_answered(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check(&bytes)?;
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_are_answered(
        component in any::<bool>(),
        rest in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = if component {
            b"\0asm\x0d\0\x01\0".to_vec()
        } else {
            b"\0asm\x01\0\0\0".to_vec()
        };
        bytes.extend(rest);
        check(&bytes)?;
    }

    #[test]
    fn mutated_guests_are_answered(bytes in mutated()) {
        check(&bytes)?;
    }
}
