//! Paths inside volumes (`subPath`, ConfigMap and Secret `items[].path`): every path the check
//! accepts, joined to a volume's directory, names something beneath it, and never one of the
//! names the agent keeps for itself there (those starting with `..`).

use std::path::{Component, Path};

use flotilla_fuzz::hostile_string;
use flotilla_model::volumes::validate_relative_path;
use proptest::prelude::*;

/// Paths made of segments that are risky alone or together.
fn segments() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(".."),
            Just("."),
            Just(""),
            Just("..data"),
            Just("a"),
            Just("b.txt"),
            Just("\0"),
            Just("/"),
            Just("..."),
            Just(" "),
        ],
        1..6,
    )
    .prop_map(|parts| parts.join("/"))
}

fn stays_inside(path: &str) -> Result<(), TestCaseError> {
    if validate_relative_path(path).is_err() {
        return Ok(());
    }
    let volume = Path::new("/var/lib/flotilla/volumes/v");
    let joined = volume.join(path);
    prop_assert!(joined.starts_with(volume), "{path:?} left the volume");
    for component in Path::new(path).components() {
        let Component::Normal(name) = component else {
            return Err(TestCaseError::fail(format!("{path:?}: {component:?}")));
        };
        prop_assert!(!name.to_string_lossy().starts_with(".."), "{path:?}");
    }
    prop_assert!(!path.contains('\0'));
    Ok(())
}

proptest! {
    #[test]
    fn accepted_paths_stay_inside_their_volume(path in hostile_string()) {
        stays_inside(&path)?;
    }

    #[test]
    fn accepted_paths_of_risky_segments_stay_inside_their_volume(path in segments()) {
        stays_inside(&path)?;
    }
}
