//! The policy builder: its result does not depend on the order of the calls, and it
//! reports every invalid setting, not only the last one.

use tokenflight::keyed::TokenKey;
use tokenflight::{AuthPolicy, AuthPolicyBuilder, ConfigError, Token, from_fn};

fn source(builder: AuthPolicyBuilder) -> AuthPolicyBuilder {
    builder.source(from_fn(|_cx| async { Ok(Token::new("t")) }))
}

fn keyed(builder: AuthPolicyBuilder) -> AuthPolicyBuilder {
    builder.keyed(|_key: &TokenKey, shared| {
        shared
            .source(from_fn(|_cx| async { Ok(Token::new("t")) }))
            .build()
    })
}

#[test]
fn key_bounds_apply_whether_set_before_or_after_keyed() {
    let before = keyed(AuthPolicy::builder().allow_any_origin().key_bounds(1, None))
        .build()
        .unwrap();
    let after = keyed(AuthPolicy::builder().allow_any_origin())
        .key_bounds(1, None)
        .build()
        .unwrap();
    for policy in [before, after] {
        let flights = policy.keyed().unwrap();
        let a = flights.flight(&TokenKey::new("a")).unwrap();
        drop(a);
        let _b = flights.flight(&TokenKey::new("b")).unwrap();
        // At most one coordinator is kept: the idle one for "a" made room for "b".
        assert_eq!(flights.len(), 1);
    }
}

#[test]
fn key_bounds_without_keyed_is_refused() {
    let error = source(AuthPolicy::builder().allow_any_origin())
        .key_bounds(5, None)
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidSetting(ref m) if m.contains("key_bounds")));
}

#[test]
fn a_list_and_any_origin_together_are_refused_in_either_order() {
    let any_first = source(AuthPolicy::builder())
        .allow_any_origin()
        .allowed_origin("https://api.example.com")
        .build();
    let list_first = source(AuthPolicy::builder())
        .allowed_origin("https://api.example.com")
        .allow_any_origin()
        .build();
    for result in [any_first, list_first] {
        let error = result.unwrap_err();
        assert!(
            matches!(error, ConfigError::InvalidSetting(ref m) if m.contains("allow_any_origin")),
            "{error}"
        );
    }
}

#[test]
fn every_invalid_origin_is_reported() {
    let error = source(AuthPolicy::builder())
        .allowed_origin("first bad")
        .allowed_origin("https://fine.example")
        .allowed_origin("second bad")
        .build()
        .unwrap_err();
    assert_eq!(
        error,
        ConfigError::Several(vec![
            ConfigError::InvalidOrigin("first bad".into()),
            ConfigError::InvalidOrigin("second bad".into()),
        ])
    );
    assert!(error.to_string().contains("first bad") && error.to_string().contains("second bad"));
}
