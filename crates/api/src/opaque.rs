//! [`Opaque`]: a field that `#[derive(Debug)]` shows without its contents.

use std::fmt;
use std::ops::Deref;

/// Wraps a value that has no useful `Debug` (a trait object, a callback), so the struct
/// holding it can derive `Debug`: it shows as `..`. Derefs to the value.
#[derive(Clone, Copy, Default)]
pub(crate) struct Opaque<T>(pub(crate) T);

impl<T> fmt::Debug for Opaque<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("..")
    }
}

impl<T> Deref for Opaque<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}
