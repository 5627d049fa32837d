//! The CRDs committed in the chart are the ones the Rust types generate.

use flotilla_control_plane::kubernetes::crds::{chart_dir, render};

#[test]
fn committed_crds_match_the_types() {
    let rendered = render().expect("render CRDs");
    let mut drifted = Vec::new();
    // A committed CRD that no type renders any more (a kind renamed or removed).
    for entry in std::fs::read_dir(chart_dir()).expect("read the chart's CRDs") {
        let name = entry.expect("dir entry").file_name();
        if !rendered
            .iter()
            .any(|(file, _)| name == std::ffi::OsStr::new(file))
        {
            drifted.push(chart_dir().join(&name).display().to_string());
        }
    }
    for (file, yaml) in rendered {
        let path = chart_dir().join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != yaml {
            drifted.push(path.display().to_string());
        }
    }
    assert!(
        drifted.is_empty(),
        "CRDs drifted from the types; run `cargo run -p flotilla-control-plane --bin crdgen`, \
         remove the files no type renders, and commit: {drifted:?}"
    );
}

#[test]
fn crds_are_structural_and_carry_the_subresources() {
    for (file, yaml) in render().expect("render CRDs") {
        assert!(!yaml.contains("additionalProperties: false"), "{file}");
        let crd: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1", "{file}");
        assert!(version["subresources"]["status"].is_mapping(), "{file}");
        if file.starts_with("wasmworkloads") {
            assert_eq!(crd["spec"]["scope"], "Namespaced");
            assert_eq!(
                version["subresources"]["scale"]["specReplicasPath"],
                ".spec.replicas"
            );
            let replicas = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["replicas"];
            assert_eq!(replicas["minimum"].as_f64(), Some(0.0), "{replicas:?}");
            // What can be checked statically, the API server checks at `kubectl apply`.
            let module = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["module"]["properties"];
            assert_eq!(module["sha256"]["pattern"], "^[0-9a-f]{64}$");
            assert_eq!(module["url"]["pattern"], "^(https?|oci)://");
        } else {
            assert_eq!(crd["spec"]["scope"], "Cluster");
        }
    }
}
