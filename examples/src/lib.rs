//! Placeholder: work in progress.
