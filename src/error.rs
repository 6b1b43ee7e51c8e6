//! One error type for every public entry point: bad input, missing features, device limits and
//! failures reported by the GPU driver all come back as an [`Error`] value, never a panic.

/// The install hint shown when no GPU adapter can be found.
pub const NO_ADAPTER_HINT: &str = "fusedops needs a GPU adapter (Vulkan, Metal or DX12). \
Install your GPU's driver, or on Debian/Ubuntu without a GPU install Mesa's CPU Vulkan driver \
(lavapipe): `sudo apt-get install mesa-vulkan-drivers`. WGPU_BACKEND and WGPU_ADAPTER_NAME, \
when set, restrict the search.";

/// Everything that can go wrong in fusedops.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matched (no driver installed, or the environment filters excluded all).
    #[error("no GPU adapter found ({detail}). {hint}")]
    NoAdapter { detail: String, hint: String },

    /// A tensor has the wrong shape or rank.
    #[error("{op}: {what} has shape {got}, expected {expected}")]
    Shape {
        op: &'static str,
        what: String,
        got: String,
        expected: String,
    },

    /// A value is out of its allowed range (an index, an offset, a parameter).
    #[error("{op}: invalid {what}: {why}")]
    Invalid {
        op: &'static str,
        what: String,
        why: String,
    },

    /// A dtype, mode or feature that this operator or adapter does not support.
    #[error("{op}: unsupported {what}")]
    Unsupported { op: &'static str, what: String },

    /// The request needs more than a device limit allows.
    #[error("device limit exceeded: {what} needs {need}, the device allows {max}")]
    Limit { what: String, need: u64, max: u64 },

    /// A validation error, out-of-memory or device loss reported by wgpu.
    #[error("GPU device error: {0}")]
    Device(String),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A file or parameter string could not be parsed.
    #[error("{what}: {why}")]
    Format { what: String, why: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Shape`].
    pub fn shape(
        op: &'static str,
        what: impl Into<String>,
        got: impl std::fmt::Debug,
        expected: impl Into<String>,
    ) -> Self {
        Error::Shape {
            op,
            what: what.into(),
            got: format!("{got:?}"),
            expected: expected.into(),
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(op: &'static str, what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            what: what.into(),
            why: why.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(op: &'static str, what: impl Into<String>) -> Self {
        Error::Unsupported {
            op,
            what: what.into(),
        }
    }
}
