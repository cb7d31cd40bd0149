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

/// A Redis URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisUrlError {
    #[error("{0} must be a redis:// or rediss:// URL")]
    Scheme(&'static str),
    #[error("{0} is not a valid URL: {1}")]
    Parse(&'static str, String),
}

/// Checks the Redis URL given as setting `what` and, when `password` is
/// given (from a mounted Secret, so it never has to be written into the
/// URL by hand), sets it in the URL, percent-encoded.
pub fn redis_url(
    what: &'static str,
    url: &str,
    password: Option<&str>,
) -> Result<String, RedisUrlError> {
    let mut parsed = url::Url::parse(url).map_err(|e| RedisUrlError::Parse(what, e.to_string()))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") || !parsed.has_host() {
        return Err(RedisUrlError::Scheme(what));
    }
    if let Some(password) = password {
        parsed
            .set_password(Some(password))
            .map_err(|()| RedisUrlError::Scheme(what))?;
    }
    Ok(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_password_is_encoded_into_the_url() {
        assert_eq!(
            redis_url("--redis-url", "redis://cache:6379/0", None).as_deref(),
            Ok("redis://cache:6379/0")
        );
        let with =
            redis_url("--redis-url", "redis://cache:6379/0", Some("p@ss/w:rd")).expect("valid");
        assert_eq!(with, "redis://:p%40ss%2Fw%3Ard@cache:6379/0");
        let info = redis::IntoConnectionInfo::into_connection_info(with.as_str()).expect("parses");
        assert_eq!(info.redis_settings().password(), Some("p@ss/w:rd"));
        assert_eq!(
            redis_url("--store", "http://cache:6379", None),
            Err(RedisUrlError::Scheme("--store"))
        );
        assert!(matches!(
            redis_url("--store", "not a url", None),
            Err(RedisUrlError::Parse(..))
        ));
    }

    #[test]
    fn bounds_are_inclusive() {
        assert_eq!(in_range("x", 1, 1, 3), Ok(()));
        assert_eq!(in_range("x", 3, 1, 3), Ok(()));
        let e = in_range("--x", 4, 1, 3).expect_err("above");
        assert_eq!(e.to_string(), "--x must be between 1 and 3");
    }
}
