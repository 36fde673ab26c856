//! The rules that change state: operations and their pipelines, the airlock
//! transitions, and the `{{ resource.… }}` substitution of pipeline steps. Each
//! function works inside the caller's [`Tx`](crate::storage::Tx), so a request or a
//! message commits or rolls back as a whole.

pub mod airlock;
pub mod operations;
pub mod pipelines;
mod substitution;

pub use airlock::AirlockQueues;
pub use substitution::{
    SubstitutionError, substitute_properties, substitute_recursively, substitute_value,
};
