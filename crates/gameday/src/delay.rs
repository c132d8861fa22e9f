//! The distribution of the injected delay between a check and its use (`--delay`), and the
//! duration syntax it shares with the network fault spec (`20ms`, `1.5s`, `250us`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;

use crate::GamedayError;

/// The longest delay a spec may ask for: a gameday measures races, not timeouts.
pub const DELAY_MS_MAX: f64 = 60_000.0;

/// How long an actor waits between its check and its use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DelayDist {
    /// Always the same: `fixed:20ms` (or just `20ms`).
    Fixed {
        /// The delay in ms.
        ms: f64,
    },
    /// Uniform between two bounds: `uniform:5ms..80ms`.
    Uniform {
        /// Lower bound in ms.
        low_ms: f64,
        /// Upper bound in ms.
        high_ms: f64,
    },
    /// Exponential with this mean (long tail, like queueing delays and GC pauses):
    /// `exp:30ms`; capped at 10 × the mean.
    Exp {
        /// The mean in ms.
        mean_ms: f64,
    },
}

impl Default for DelayDist {
    fn default() -> Self {
        Self::Uniform { low_ms: 10.0, high_ms: 60.0 }
    }
}

impl DelayDist {
    /// One delay drawn from the distribution.
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        let ms = match *self {
            Self::Fixed { ms } => ms,
            Self::Uniform { low_ms, high_ms } if high_ms > low_ms => rng.gen_range(low_ms..high_ms),
            Self::Uniform { low_ms, .. } => low_ms,
            Self::Exp { mean_ms } => {
                let u: f64 = rng.gen_range(f64::EPSILON..1.0);
                (-u.ln() * mean_ms).min(mean_ms * 10.0)
            }
        };
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    /// The mean delay in ms (scenarios size their leases and revocation windows on it).
    pub fn mean_ms(&self) -> f64 {
        match *self {
            Self::Fixed { ms } => ms,
            Self::Uniform { low_ms, high_ms } => (low_ms + high_ms) / 2.0,
            Self::Exp { mean_ms } => mean_ms,
        }
    }
}

impl fmt::Display for DelayDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Fixed { ms } => write!(f, "fixed:{ms}ms"),
            Self::Uniform { low_ms, high_ms } => write!(f, "uniform:{low_ms}ms..{high_ms}ms"),
            Self::Exp { mean_ms } => write!(f, "exp:{mean_ms}ms"),
        }
    }
}

impl FromStr for DelayDist {
    type Err = GamedayError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| GamedayError::InvalidDelay { spec: spec.to_owned(), reason };
        let ms = |text: &str| parse_ms(text).map_err(invalid);
        let (kind, rest) = spec.trim().split_once(':').unwrap_or(("fixed", spec.trim()));
        let dist = match kind {
            "fixed" => Self::Fixed { ms: ms(rest)? },
            "uniform" => {
                let (low, high) = rest.split_once("..").ok_or_else(|| invalid("uniform needs LOW..HIGH".into()))?;
                let (low_ms, high_ms) = (ms(low)?, ms(high)?);
                if low_ms > high_ms {
                    return Err(invalid(format!("the low bound {low} is above the high bound {high}")));
                }
                Self::Uniform { low_ms, high_ms }
            }
            "exp" => Self::Exp { mean_ms: ms(rest)? },
            other => return Err(invalid(format!("unknown distribution {other:?} (fixed, uniform or exp)"))),
        };
        Ok(dist)
    }
}

/// Parses `20ms`, `1.5s`, `250us` (a unit is required) into milliseconds, within
/// 0..=[`DELAY_MS_MAX`].
pub fn parse_ms(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, factor) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return Err(format!("{text:?} needs a unit (us, ms or s)"));
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("{number:?} is not a number"))?;
    let ms = value * factor;
    if !ms.is_finite() || !(0.0..=DELAY_MS_MAX).contains(&ms) {
        return Err(format!("{text} is out of range (0 to {DELAY_MS_MAX} ms)"));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn specs_parse_and_print_back() {
        for (spec, dist) in [
            ("20ms", DelayDist::Fixed { ms: 20.0 }),
            ("fixed:1.5s", DelayDist::Fixed { ms: 1500.0 }),
            ("uniform:5ms..80ms", DelayDist::Uniform { low_ms: 5.0, high_ms: 80.0 }),
            ("exp:250us", DelayDist::Exp { mean_ms: 0.25 }),
        ] {
            let parsed: DelayDist = spec.parse().unwrap();
            assert_eq!(parsed, dist, "{spec}");
            assert_eq!(parsed.to_string().parse::<DelayDist>().unwrap(), dist);
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, needle) in [
            ("20", "needs a unit"),
            ("gauss:20ms", "unknown distribution"),
            ("uniform:80ms..5ms", "above the high bound"),
            ("uniform:5ms", "LOW..HIGH"),
            ("fixed:xms", "not a number"),
            ("fixed:61s", "out of range"),
            ("fixed:-1ms", "out of range"),
        ] {
            let err = spec.parse::<DelayDist>().unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn samples_stay_in_bounds_and_repeat_with_the_seed() {
        let dist = DelayDist::Uniform { low_ms: 5.0, high_ms: 10.0 };
        let draw = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            (0..100).map(|_| dist.sample(&mut rng)).collect::<Vec<_>>()
        };
        let first = draw(7);
        assert!(first.iter().all(|d| (5.0..10.0).contains(&(d.as_secs_f64() * 1000.0))));
        assert_eq!(first, draw(7));
        assert_ne!(first, draw(8));
        let exp = DelayDist::Exp { mean_ms: 10.0 };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert!((0..1000).all(|_| exp.sample(&mut rng) <= Duration::from_millis(100)));
    }
}
