//! What compiling a module would cost, read from its sections before it is compiled, and the
//! agent's limits on it: a module over them is refused at once with its reason
//! (`ModuleTooCostly`), instead of occupying a compile slot until `--compile-timeout`.
//!
//! Cranelift's time grows with the number of functions and the bytes of code; both are in the
//! module's section headers, so the look costs a pass over the headers, not a validation.

/// The compile cost of a module or component (every core module in it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleCost {
    /// Functions defined (not imported).
    pub functions: u64,
    /// Bytes of function bodies.
    pub code_bytes: u64,
}

/// The most a module may cost before it is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostLimits {
    /// Most functions defined, over every core module of a component.
    pub max_functions: u64,
    /// Most bytes of function bodies.
    pub max_code_bytes: u64,
}

impl Default for CostLimits {
    /// Far above what real programs need (large Rust or C++ programs define some tens of
    /// thousands of functions), far below what takes minutes to compile.
    fn default() -> Self {
        Self {
            max_functions: DEFAULT_MAX_FUNCTIONS,
            max_code_bytes: DEFAULT_MAX_CODE_BYTES,
        }
    }
}

/// Default of [`CostLimits::max_functions`].
pub const DEFAULT_MAX_FUNCTIONS: u64 = 250_000;
/// Default of [`CostLimits::max_code_bytes`]: 32 MiB, the default module size limit.
pub const DEFAULT_MAX_CODE_BYTES: u64 = 32 << 20;

/// A module over the agent's cost limits.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// Too many functions.
    #[error(
        "the module defines {functions} functions; this agent compiles at most {limit} \
         (--max-module-functions)"
    )]
    Functions {
        /// Functions defined.
        functions: u64,
        /// The limit.
        limit: u64,
    },
    /// Too much code.
    #[error(
        "the module has {code_bytes} bytes of code; this agent compiles at most {limit} \
         (--max-module-code-size)"
    )]
    Code {
        /// Bytes of function bodies.
        code_bytes: u64,
        /// The limit.
        limit: u64,
    },
}

impl CostLimits {
    /// Whether `cost` is within the limits.
    ///
    /// # Errors
    /// The first limit `cost` is over.
    pub fn check(&self, cost: &ModuleCost) -> Result<(), CostError> {
        if cost.functions > self.max_functions {
            return Err(CostError::Functions {
                functions: cost.functions,
                limit: self.max_functions,
            });
        }
        if cost.code_bytes > self.max_code_bytes {
            return Err(CostError::Code {
                code_bytes: cost.code_bytes,
                limit: self.max_code_bytes,
            });
        }
        Ok(())
    }
}

/// The cost of `wasm`, a module or a component, as far as its headers can be read; a malformed
/// module's cost is what was read before the fault (compiling it reports the fault).
pub(super) fn of(wasm: &[u8]) -> ModuleCost {
    let mut cost = ModuleCost::default();
    // parse_all walks nested modules and components too.
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload {
            Ok(wasmparser::Payload::FunctionSection(functions)) => {
                cost.functions += u64::from(functions.count());
            }
            Ok(wasmparser::Payload::CodeSectionStart { size, .. }) => {
                cost.code_bytes += u64::from(size);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    cost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module_with(functions: usize) -> Vec<u8> {
        let mut wat = String::from("(module");
        for _ in 0..functions {
            wat.push_str(" (func (result i32) i32.const 7)");
        }
        wat.push(')');
        wat::parse_str(&wat).expect("valid wat")
    }

    #[test]
    fn counts_functions_and_code_of_modules_and_of_the_modules_in_components() {
        let module = of(&module_with(3));
        assert_eq!(module.functions, 3);
        assert!(module.code_bytes >= 3 * 4, "{module:?}");

        let component = wat::parse_str(
            "(component
               (core module (func) (func))
               (core module (func (result i32) i32.const 1)))",
        )
        .expect("valid wat");
        assert_eq!(of(&component).functions, 3);

        assert_eq!(of(b"\0asm garbage").functions, 0);
    }

    #[test]
    fn limits_refuse_the_first_cost_over_them_and_name_the_flag() {
        let limits = CostLimits {
            max_functions: 2,
            max_code_bytes: 1000,
        };
        assert!(limits.check(&of(&module_with(2))).is_ok());
        let error = limits.check(&of(&module_with(3))).expect_err("over");
        assert!(
            error.to_string().contains("3 functions")
                && error.to_string().contains("--max-module-functions"),
            "{error}"
        );
        let error = limits
            .check(&ModuleCost {
                functions: 1,
                code_bytes: 1001,
            })
            .expect_err("over");
        assert!(
            error.to_string().contains("--max-module-code-size"),
            "{error}"
        );
    }
}
