//! Identifier rules for tenants, rooms, peers and key ids.
//!
//! Identifiers travel inside TURN usernames (`:`-separated), Redis keys and
//! URLs, so they are restricted to a small, unambiguous alphabet.

/// Longest identifier accepted anywhere.
pub const MAX_ID_LEN: usize = 64;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {MAX_ID_LEN} characters")]
    TooLong { what: &'static str },
    #[error("{what} may contain only letters, digits, '-', '_' and '.'")]
    BadChar { what: &'static str },
    #[error("{what} must not consist of dots only")]
    Dots { what: &'static str },
}

/// Checks that `value` is a valid identifier; `what` names it in the error.
pub fn validate(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { what });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(IdError::BadChar { what });
    }
    // "." and ".." would name a folder when the id lands in a URL path.
    if value.bytes().all(|b| b == b'.') {
        return Err(IdError::Dots { what });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids_and_refuses_separators() {
        assert!(validate("room", "abc-DEF_1.2").is_ok());
        assert_eq!(validate("room", ""), Err(IdError::Empty { what: "room" }));
        assert_eq!(
            validate("peer", "a:b"),
            Err(IdError::BadChar { what: "peer" })
        );
        assert_eq!(
            validate("peer", "a/b"),
            Err(IdError::BadChar { what: "peer" })
        );
        assert_eq!(
            validate("tenant", &"x".repeat(65)),
            Err(IdError::TooLong { what: "tenant" })
        );
        assert_eq!(validate("peer", ".."), Err(IdError::Dots { what: "peer" }));
        assert!(validate("peer", "a..b").is_ok());
    }
}
