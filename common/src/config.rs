//! Checks shared by every component's configuration.

/// A numeric setting outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be between {min} and {max}")]
pub struct OutOfRange {
    pub what: &'static str,
    pub min: u64,
    pub max: u64,
}

/// Checks that setting `what` = `value` lies in `min..=max`.
pub fn in_range(what: &'static str, value: u64, min: u64, max: u64) -> Result<(), OutOfRange> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(OutOfRange { what, min, max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive() {
        assert_eq!(in_range("x", 1, 1, 3), Ok(()));
        assert_eq!(in_range("x", 3, 1, 3), Ok(()));
        let e = in_range("--x", 4, 1, 3).expect_err("above");
        assert_eq!(e.to_string(), "--x must be between 1 and 3");
    }
}
