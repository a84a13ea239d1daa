//! Flag types shared by several subcommands (and by `zmesh-datapath proxy`).

use std::time::Duration;

/// What happens to plaintext TCP from outside the mesh to local workloads.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ModeArg {
    /// Passed through to the workload, logged as unencrypted.
    Permissive,
    /// Refused: only mTLS reaches the workloads; plain TCP is reset.
    Strict,
}

impl From<ModeArg> for zmesh_dataplane::Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Permissive => Self::Permissive,
            ModeArg::Strict => Self::Strict,
        }
    }
}

/// Parses durations like `90s`, `10m`, `24h`, `30d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10m or 24h"))?;
    let multiplier = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use s, m, h or d")),
    };
    let seconds = n
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if seconds == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "0", "0s", "m", "10x", "-5m", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
