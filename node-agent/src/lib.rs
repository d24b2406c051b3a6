//! The bpfpoly node agent as a library: the loader (the aya edge: load, attach, pin,
//! fall back), bytecode fetching, object inspection and the built-in objects. The
//! binary (`main.rs`) adds the CLI, the kernel profile and the Kubernetes run loop.

pub mod builtin;
pub mod capped;
pub mod fetch;
pub mod inspect;
pub mod kconfig;
pub mod loader;
pub mod sys;
