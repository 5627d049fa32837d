//! [`Linkers`]: the host functions guests may import, filled once per process: WASI preview 1
//! for core modules; WASI preview 2, WASI 0.3 and `wasi:http` for components.

use wasmtime::Engine;
use wasmtime::Linker;
use wasmtime::component::Linker as ComponentLinker;

use super::store::{P1State, P2State};

/// The linkers of one engine.
pub(super) struct Linkers {
    /// For preview 1 command modules.
    pub module: Linker<P1State>,
    /// For components: commands (WASI 0.2 and 0.3) and HTTP handlers.
    pub component: ComponentLinker<P2State>,
}

// === impl Linkers ===

impl Linkers {
    /// Links WASI (and `wasi:http` for components) for sandboxes of `engine`; WASI 0.3 when
    /// `wasi_0_3` (the engine supports the component model's async ABI).
    ///
    /// # Errors
    /// WASI could not be added to a linker.
    pub(super) fn new(engine: &Engine, wasi_0_3: bool) -> wasmtime::Result<Self> {
        let mut module = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module, |s: &mut P1State| &mut s.wasi)?;
        let mut component = ComponentLinker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
        if wasi_0_3 {
            wasmtime_wasi::p3::add_to_linker(&mut component)?;
            wasmtime_wasi_http::p3::add_to_linker(&mut component)?;
        }
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component)?;
        Ok(Self { module, component })
    }
}
