//! Manifests: whatever a user sends, parsing and validation answer with a result, never a
//! panic, and what they accept survives the store's JSON encoding unchanged and valid.

use flotilla_fuzz::{hostile_string, manifest};
use flotilla_model::Workload;
use flotilla_model::volumes::validate_relative_path;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

proptest! {
    #[test]
    fn arbitrary_text_is_refused_or_accepted_never_a_panic(text in any::<String>()) {
        let _ = Workload::from_yaml(&text);
    }

    #[test]
    fn near_valid_manifests_that_pass_survive_the_store(text in manifest()) {
        let Ok(workloads) = Workload::from_yaml(&text) else {
            return Ok(());
        };
        for workload in workloads {
            let json = serde_json::to_vec(&workload).expect("an accepted workload encodes");
            let decoded: Workload = serde_json::from_slice(&json).expect("and decodes");
            prop_assert_eq!(&decoded, &workload);
            prop_assert!(decoded.validate().is_ok());
            // Every path inside a volume that validation let through stays inside it.
            for mount in &workload.spec.volume_mounts {
                if let Some(sub_path) = &mount.sub_path {
                    prop_assert!(validate_relative_path(sub_path).is_ok(), "{sub_path:?}");
                }
            }
            prop_assert!(workload.spec.replicas >= 0);
        }
    }

    #[test]
    fn quantities_parse_or_fail_without_panicking(text in hostile_string()) {
        let _ = flotilla_model::parse_bytes(&text);
        let _ = flotilla_model::parse_cpu_millis(&text);
        let _ = flotilla_model::parse_bounded_duration(&text);
        let _ = flotilla_model::validate_name(&text);
    }
}

/// The generator reaches past parsing: a good share of its manifests are valid, so the
/// property above checks accepted workloads, not only refusals.
#[test]
fn the_generator_makes_valid_manifests_too() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = manifest();
    let (mut valid, total) = (0, 512);
    for _ in 0..total {
        let text = strategy.new_tree(&mut runner).expect("a case").current();
        valid += usize::from(Workload::from_yaml(&text).is_ok());
    }
    assert!(valid * 5 >= total, "only {valid} of {total} valid");
    assert!(valid < total, "every manifest valid: nothing refused");
}
