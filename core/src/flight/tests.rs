//! The coordinator's own tests: the state lock's cost per refresh.
