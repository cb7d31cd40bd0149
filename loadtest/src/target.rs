//! Which addresses the load tester may send to: loopback, or addresses the
//! operator named explicitly with `--allow-target`. Load is never aimed at
//! an address by accident.

use std::net::IpAddr;

/// Why a target was refused.
#[derive(Debug, thiserror::Error)]
#[error("refusing to load {0}: only loopback or --allow-target addresses are allowed")]
pub struct TargetRefused(pub IpAddr);

/// Checks that `ip` is loopback or listed in `allowed`.
pub fn check(ip: IpAddr, allowed: &[IpAddr]) -> Result<(), TargetRefused> {
    if ip.is_loopback() || allowed.contains(&ip) {
        Ok(())
    } else {
        Err(TargetRefused(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_or_explicit_only() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(check(ip("127.0.0.1"), &[]).is_ok());
        assert!(check(ip("127.8.9.10"), &[]).is_ok());
        assert!(check(ip("::1"), &[]).is_ok());
        assert!(check(ip("10.0.0.1"), &[]).is_err());
        assert!(check(ip("10.0.0.1"), &[ip("10.0.0.1")]).is_ok());
        assert!(check(ip("8.8.8.8"), &[ip("10.0.0.1")]).is_err());
    }
}
