//! Calendar helpers for the usage ledger: UTC days and months from Unix time.
//!
//! The ledger keys totals by UTC day (`YYYY-MM-DD`) and quotas by calendar
//! month (`YYYY-MM`). This is the civil-from-days algorithm, exact for the
//! proleptic Gregorian calendar, so no time-zone library is needed.

/// A UTC calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// The UTC date that contains the Unix time `secs`.
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Self { year, month, day }
    }

    /// `YYYY-MM-DD`.
    pub fn day_key(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `YYYY-MM`.
    pub fn month_key(&self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }
}

/// Seconds since the Unix epoch, from the system clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(Date::from_unix(0).day_key(), "1970-01-01");
        // 2000-02-29, a leap day in a century leap year.
        assert_eq!(Date::from_unix(951_782_400).day_key(), "2000-02-29");
        // 2026-11-23 12:00:00 UTC.
        let d = Date::from_unix(1_795_435_200);
        assert_eq!(d.day_key(), "2026-11-23");
        assert_eq!(d.month_key(), "2026-11");
        // Last second of 2024-12-31.
        assert_eq!(Date::from_unix(1_735_689_599).day_key(), "2024-12-31");
        assert_eq!(Date::from_unix(1_735_689_600).day_key(), "2025-01-01");
    }
}
