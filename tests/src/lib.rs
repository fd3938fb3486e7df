//! Test support for tokenflight: the testkit server (a real loopback auth + API server),
//! the conformance suite every adapter runs, and shared property-test machinery.
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod conformance;
pub mod fuzz_targets;
pub mod grpc;
pub mod keyed_processes;
pub mod model;
pub mod sources;
pub mod testkit;
pub mod transport;
pub mod worker;

/// An observer that calls `f` with the error when re-authentication becomes necessary
/// (`Observer::auth_lost`).
pub struct OnAuthLost<F>(F);

impl<F> std::fmt::Debug for OnAuthLost<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnAuthLost")
    }
}

/// An [`OnAuthLost`] observer of `f` (a function, so a closure's argument type is
/// inferred from the bound).
pub fn on_auth_lost<F: Fn(&tokenflight::RefreshError) + Send + Sync>(f: F) -> OnAuthLost<F> {
    OnAuthLost(f)
}

impl<F: Fn(&tokenflight::RefreshError) + Send + Sync> tokenflight::observe::Observer
    for OnAuthLost<F>
{
    fn auth_lost(&self, event: &tokenflight::observe::AuthLost<'_>) {
        (self.0)(event.error)
    }
}

/// Saves `token` the only way a store allows: under its lock (lock → save → unlock).
/// Tests use it to seed a store as another process would have.
pub async fn save_locked<S: tokenflight::store::TokenStore + ?Sized>(
    store: &S,
    token: &tokenflight::Token,
) -> Result<(), tokenflight::store::StoreError> {
    let guard = store.lock().await?;
    let saved = guard.save(token).await;
    guard.unlock().await;
    saved
}
