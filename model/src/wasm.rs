//! WebAssembly proposals a workload opts into (`spec.wasm.features`), and which of them a module
//! needs.
//!
//! Every workload runs with the default set: WebAssembly 3.0 without garbage collection and
//! exceptions (SIMD and relaxed SIMD, bulk memory, reference types for functions, function
//! references, multi-value, multi-memory, 64-bit memories, tail calls, extended constants) and
//! the component model. [`WasmFeature`]s add to it per workload. The control plane refuses at
//! apply, and the agent before it runs one, a module that uses a proposal its workload did not
//! enable, with a message naming the field to set ([`MissingFeatures`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use wasmparser::WasmFeatures;

/// WebAssembly options of a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct WasmSpec {
    /// Proposals beyond the default set that the module may use, e.g. `[gc, exceptions]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<WasmFeature>,
}

/// A WebAssembly proposal that a workload may opt into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum WasmFeature {
    /// Garbage collection: `struct`, `array`, `i31`, `anyref` and `externref` values on a heap
    /// that wasmtime's deferred reference-counting collector manages, counted against the
    /// sandbox's memory limit.
    Gc,
    /// Exception handling: tags, `throw`, `throw_ref` and `try_table`. An exception that no
    /// handler catches ends the run as a trap.
    Exceptions,
    /// 128-bit integer arithmetic (`i64.add128`, `i64.mul_wide_u`, ...).
    WideArithmetic,
    /// Memories with a page size of one byte instead of 64 KiB, for small embedded guests.
    CustomPageSizes,
    /// The component model's async ABI, which WASI 0.3 components use: `async` functions,
    /// `stream` and `future` values, tasks. A WASI 0.3 command (`wasi:cli/run@0.3.0`) needs it.
    ComponentModelAsync,
    /// Threads: a shared memory, atomics, and `wasi-threads`' `thread-spawn` for a core module
    /// (a WASI preview 1 command built for `wasm32-wasip1-threads`).
    Threads,
}

/// A set of [`WasmFeature`]s. Cheap to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet(u8);

/// A module that uses proposals its workload did not enable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the module uses {what}, which the workload does not enable: add {list} to \
     spec.wasm.features",
    what = self.describe(),
    list = self.missing.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
)]
pub struct MissingFeatures {
    /// What the module uses and the workload lacks.
    pub missing: FeatureSet,
}

/// A module that is not valid WebAssembly with any set of features Flotilla supports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a valid WebAssembly module or component: {0}")]
pub struct InvalidWasm(pub String);

/// A feature name that is not one of [`WasmFeature::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown WebAssembly feature {0:?}: expected one of {list}", list = WasmFeature::names())]
pub struct UnknownFeature(pub String);

// === impl WorkloadSpec ===

impl crate::WorkloadSpec {
    /// The features `spec.wasm.features` enables.
    pub fn wasm_features(&self) -> FeatureSet {
        self.wasm
            .iter()
            .flat_map(|wasm| wasm.features.iter().copied())
            .collect()
    }
}

// === impl WasmFeature ===

impl WasmFeature {
    /// Every feature a workload may enable.
    pub const ALL: [WasmFeature; 6] = [
        WasmFeature::Gc,
        WasmFeature::Exceptions,
        WasmFeature::WideArithmetic,
        WasmFeature::CustomPageSizes,
        WasmFeature::ComponentModelAsync,
        WasmFeature::Threads,
    ];

    /// The name in manifests and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            WasmFeature::Gc => "gc",
            WasmFeature::Exceptions => "exceptions",
            WasmFeature::WideArithmetic => "wide-arithmetic",
            WasmFeature::CustomPageSizes => "custom-page-sizes",
            WasmFeature::ComponentModelAsync => "component-model-async",
            WasmFeature::Threads => "threads",
        }
    }

    /// The label a node carries when its agent offers this feature (value `"true"`), set by
    /// the control plane from the agent's registration: `wasm.flotilla.dev/gc`, ...
    pub fn node_label(self) -> &'static str {
        match self {
            WasmFeature::Gc => "wasm.flotilla.dev/gc",
            WasmFeature::Exceptions => "wasm.flotilla.dev/exceptions",
            WasmFeature::WideArithmetic => "wasm.flotilla.dev/wide-arithmetic",
            WasmFeature::CustomPageSizes => "wasm.flotilla.dev/custom-page-sizes",
            WasmFeature::ComponentModelAsync => "wasm.flotilla.dev/component-model-async",
            WasmFeature::Threads => "wasm.flotilla.dev/threads",
        }
    }

    /// The prefix of every [`node_label`](Self::node_label).
    pub const NODE_LABEL_PREFIX: &'static str = "wasm.flotilla.dev/";

    /// The proposal, as a message names it.
    fn proposal(self) -> &'static str {
        match self {
            WasmFeature::Gc => "WebAssembly garbage collection (the GC proposal)",
            WasmFeature::Exceptions => "WebAssembly exception handling",
            WasmFeature::WideArithmetic => "WebAssembly wide arithmetic",
            WasmFeature::CustomPageSizes => "WebAssembly custom page sizes",
            WasmFeature::ComponentModelAsync => "the component model's async ABI (WASI 0.3)",
            WasmFeature::Threads => "WebAssembly threads (a shared memory and atomics)",
        }
    }

    /// What the validator must accept for this feature, beyond the default set.
    fn validator_features(self) -> WasmFeatures {
        match self {
            WasmFeature::Gc => WasmFeatures::GC_TYPES,
            WasmFeature::Exceptions => WasmFeatures::EXCEPTIONS,
            WasmFeature::WideArithmetic => WasmFeatures::WIDE_ARITHMETIC,
            WasmFeature::CustomPageSizes => WasmFeatures::CUSTOM_PAGE_SIZES,
            WasmFeature::ComponentModelAsync => WasmFeatures::CM_ASYNC,
            WasmFeature::Threads => WasmFeatures::THREADS,
        }
    }

    /// Whether wasmtime 48 gives the proposal no security fixes in patch releases (the async
    /// ABI is below tier 2, shared memories are tier 2): a node offers it only when its
    /// operator says so ([`FeatureSet::NODE_DEFAULT`] leaves it out).
    pub fn is_experimental(self) -> bool {
        matches!(
            self,
            WasmFeature::ComponentModelAsync | WasmFeature::Threads
        )
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for WasmFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WasmFeature {
    type Err = UnknownFeature;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFeature(s.to_string()))
    }
}

// === impl FeatureSet ===

impl FeatureSet {
    /// No feature beyond the default set.
    pub const NONE: FeatureSet = FeatureSet(0);

    /// What a node agent offers unless told otherwise: every feature that is not
    /// [experimental](WasmFeature::is_experimental).
    pub const NODE_DEFAULT: FeatureSet = FeatureSet(
        (1 << WasmFeature::Gc as u8)
            | (1 << WasmFeature::Exceptions as u8)
            | (1 << WasmFeature::WideArithmetic as u8)
            | (1 << WasmFeature::CustomPageSizes as u8),
    );

    /// Every feature.
    pub const ALL: FeatureSet = FeatureSet((1 << WasmFeature::ALL.len()) - 1);

    /// Whether `feature` is in the set.
    pub fn contains(self, feature: WasmFeature) -> bool {
        self.0 & feature.bit() != 0
    }

    /// Whether the set holds nothing.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The features of `self` that `other` lacks.
    pub fn without(self, other: FeatureSet) -> FeatureSet {
        FeatureSet(self.0 & !other.0)
    }

    /// The set with `feature` added.
    pub fn with(self, feature: WasmFeature) -> FeatureSet {
        FeatureSet(self.0 | feature.bit())
    }

    /// The features in the set, in [`WasmFeature::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = WasmFeature> {
        WasmFeature::ALL
            .into_iter()
            .filter(move |f| self.contains(*f))
    }

    /// Parses wire names (`gc`, `exceptions`, ...).
    ///
    /// # Errors
    /// The first name that is no [`WasmFeature`].
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<FeatureSet, UnknownFeature> {
        names.iter().try_fold(FeatureSet::NONE, |set, name| {
            Ok(set.with(name.as_ref().parse()?))
        })
    }

    /// Parses a comma-separated list of feature names, as the agent's `--wasm-features` takes
    /// it; `none` is the empty set and blanks between commas are ignored.
    ///
    /// # Errors
    /// The first name that is no [`WasmFeature`].
    pub fn parse_list(list: &str) -> Result<FeatureSet, UnknownFeature> {
        if list.trim() == "none" {
            return Ok(FeatureSet::NONE);
        }
        let names: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .collect();
        FeatureSet::parse(&names)
    }

    /// What a validator accepts for a workload with these features.
    pub fn validator_features(self) -> WasmFeatures {
        self.iter()
            .fold(default_features(), |all, f| all | f.validator_features())
    }

    /// Checks that `self` (what a workload enables) covers `required` (what its module uses).
    ///
    /// # Errors
    /// The features the module uses and the workload does not enable.
    pub fn check(self, required: FeatureSet) -> Result<(), MissingFeatures> {
        let missing = required.without(self);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(MissingFeatures { missing })
        }
    }
}

impl FromIterator<WasmFeature> for FeatureSet {
    fn from_iter<I: IntoIterator<Item = WasmFeature>>(iter: I) -> Self {
        iter.into_iter().fold(FeatureSet::NONE, FeatureSet::with)
    }
}

impl fmt::Display for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.iter().map(WasmFeature::name).collect();
        f.write_str(&names.join(", "))
    }
}

// === impl MissingFeatures ===

impl MissingFeatures {
    fn describe(&self) -> String {
        let proposals: Vec<_> = self.missing.iter().map(WasmFeature::proposal).collect();
        proposals.join(" and ")
    }
}

/// What every workload may use: WebAssembly 3.0 and the component model, without garbage
/// collection (nor `externref`, which needs a collector), exceptions and threads; what the node
/// agent's engine accepted before features could be enabled per workload.
pub fn default_features() -> WasmFeatures {
    (WasmFeatures::WASM3 | WasmFeatures::COMPONENT_MODEL)
        & !(WasmFeatures::GC_TYPES | WasmFeatures::EXCEPTIONS | WasmFeatures::THREADS)
}

/// The features of [`WasmFeature::ALL`] that `wasm` (a module or component) uses.
///
/// Validates once when the module needs nothing beyond the default set, and once more per
/// feature otherwise: a feature is needed when the module is invalid without it.
///
/// # Errors
/// The module is invalid even with every feature enabled.
pub fn required_features(wasm: &[u8]) -> Result<FeatureSet, InvalidWasm> {
    let valid = |features: FeatureSet| validate(wasm, features.validator_features());
    if valid(FeatureSet::NONE).is_ok() {
        return Ok(FeatureSet::NONE);
    }
    let all: FeatureSet = WasmFeature::ALL.into_iter().collect();
    valid(all).map_err(|e| InvalidWasm(e.to_string()))?;
    Ok(WasmFeature::ALL
        .into_iter()
        .filter(|&f| valid(all.without(FeatureSet::NONE.with(f))).is_err())
        .collect())
}

fn validate(wasm: &[u8], features: WasmFeatures) -> Result<(), wasmparser::BinaryReaderError> {
    wasmparser::Validator::new_with_features(features)
        .validate_all(wasm)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module of the given sections, written by hand in the binary format.
    fn module(sections: &[u8]) -> Vec<u8> {
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        wasm.extend_from_slice(sections);
        wasm
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for feature in WasmFeature::ALL {
            assert_eq!(feature.name().parse::<WasmFeature>(), Ok(feature));
            let yaml = serde_yaml::to_string(&feature).expect("serialize");
            assert_eq!(yaml.trim(), feature.name());
        }
        let err = FeatureSet::parse(&["gc", "threadz"]).expect_err("unknown");
        assert!(err.to_string().contains("\"threadz\""), "{err}");
        assert!(err.to_string().contains("gc, exceptions"), "{err}");
        let set = FeatureSet::parse(&["exceptions", "gc"]).expect("known");
        assert_eq!(set.to_string(), "gc, exceptions");
        assert_eq!(FeatureSet::parse_list(" gc, ,exceptions "), Ok(set));
        assert_eq!(FeatureSet::parse_list("none"), Ok(FeatureSet::NONE));
        assert_eq!(FeatureSet::parse_list(""), Ok(FeatureSet::NONE));
        assert!(FeatureSet::parse_list("gc,threadz").is_err());
    }

    #[test]
    fn nodes_offer_every_feature_but_the_experimental_ones_by_default() {
        let experimental: FeatureSet = WasmFeature::ALL
            .into_iter()
            .filter(|f| f.is_experimental())
            .collect();
        assert_eq!(experimental.to_string(), "component-model-async, threads");
        assert_eq!(
            FeatureSet::NODE_DEFAULT,
            FeatureSet::ALL.without(experimental)
        );
        assert_eq!(FeatureSet::ALL.iter().count(), WasmFeature::ALL.len());
        for feature in WasmFeature::ALL {
            let label = feature.node_label();
            assert_eq!(
                label.strip_prefix(WasmFeature::NODE_LABEL_PREFIX),
                Some(feature.name())
            );
        }
    }

    #[test]
    fn a_plain_module_needs_nothing() {
        assert_eq!(required_features(&module(&[])), Ok(FeatureSet::NONE));
    }

    #[test]
    fn a_struct_type_needs_gc_and_the_message_names_the_field() {
        // Type section: one type, a struct (0x5f) of one mutable i32 field.
        let wasm = module(&[0x01, 0x05, 0x01, 0x5f, 0x01, 0x7f, 0x01]);
        let required = required_features(&wasm).expect("valid with gc");
        assert_eq!(required, FeatureSet::NONE.with(WasmFeature::Gc));
        let err = FeatureSet::NONE
            .check(required)
            .expect_err("gc not enabled");
        assert_eq!(
            err.to_string(),
            "the module uses WebAssembly garbage collection (the GC proposal), which the \
             workload does not enable: add `gc` to spec.wasm.features"
        );
        assert!(required.check(required).is_ok());
    }

    #[test]
    fn a_tag_needs_exceptions() {
        // Type section: () -> (); tag section (13): one tag of attribute 0 and type 0.
        let wasm = module(&[
            0x01, 0x04, 0x01, 0x60, 0x00, 0x00, 0x0d, 0x03, 0x01, 0x00, 0x00,
        ]);
        assert_eq!(
            required_features(&wasm),
            Ok(FeatureSet::NONE.with(WasmFeature::Exceptions))
        );
    }

    #[test]
    fn a_shared_memory_needs_threads() {
        // Memory section (5): one memory, shared with a maximum (flags 3), of 1 to 1 pages.
        let wasm = module(&[0x05, 0x04, 0x01, 0x03, 0x01, 0x01]);
        assert_eq!(
            required_features(&wasm),
            Ok(FeatureSet::NONE.with(WasmFeature::Threads))
        );
    }

    #[test]
    fn a_module_invalid_with_every_feature_is_invalid() {
        let err = required_features(&module(&[0x01, 0xff])).expect_err("truncated section");
        assert!(
            err.to_string().starts_with("not a valid WebAssembly"),
            "{err}"
        );
    }

    #[test]
    fn spec_lists_features_by_name() {
        let spec: WasmSpec =
            serde_yaml::from_str("features: [gc, wide-arithmetic]").expect("parse");
        assert_eq!(
            spec.features,
            vec![WasmFeature::Gc, WasmFeature::WideArithmetic]
        );
        let err = serde_yaml::from_str::<WasmSpec>("features: [threadz]").expect_err("unknown");
        assert!(
            err.to_string().contains("unknown variant `threadz`"),
            "{err}"
        );
    }
}
