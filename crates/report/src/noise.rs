//! Exact sampling of discrete Laplace noise, for the transparency report.
//!
//! The noise is drawn with integer arithmetic only, after Canonne, Kamath and Steinke, "The
//! Discrete Gaussian for Differential Privacy" (NeurIPS 2020), algorithms 1 and 2: a Bernoulli
//! of `exp(−γ)` for rational `γ` from uniform integers, then the discrete Laplace from those.
//! Nothing is rounded, so the distribution drawn is exactly the one the privacy proof assumes;
//! floating-point Laplace samplers leak through the gaps between representable numbers
//! (Mironov, "On significance of the least significant bits for differential privacy", CCS
//! 2012), which is why this one is built on integers.
//!
//! Why our own and not OpenDP's: its Rust crate draws the same algorithm, but brings a vendored
//! OpenSSL build, rand 0.7, num 0.3, syn 1 and statrs beside the versions this workspace already
//! builds, minutes of compile on two cores for some forty lines. These are tested as such a
//! library tests its own (the tests below): each sampler against its exact distribution by a
//! chi-square test, with fixed seeds so that a run is repeatable.
//!
//! The random bits come from a [`Randomness`]: the operating system's generator
//! ([`OsRandomness`], `getrandom`) when a report is published, a seeded one in tests.

/// A source of uniformly random bits.
pub trait Randomness {
    /// 64 uniformly random bits.
    fn next_u64(&mut self) -> u64;
}

/// The operating system's cryptographically secure generator, read 64 bytes at a time.
#[derive(Debug)]
pub struct OsRandomness {
    buffer: [u8; 64],
    used: usize,
}

impl OsRandomness {
    /// A generator that reads the operating system's on first use.
    pub fn new() -> OsRandomness {
        OsRandomness {
            buffer: [0; 64],
            used: 64,
        }
    }
}

impl Default for OsRandomness {
    fn default() -> OsRandomness {
        OsRandomness::new()
    }
}

impl Randomness for OsRandomness {
    fn next_u64(&mut self) -> u64 {
        if self.used + 8 > self.buffer.len() {
            // Without the system's generator there is no safe noise, and a report without it
            // would publish exact counts about people: stopping is the only safe answer.
            #[allow(clippy::expect_used)]
            getrandom::fill(&mut self.buffer).expect("the system's random generator failed");
            self.used = 0;
        }
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&self.buffer[self.used..self.used + 8]);
        self.used += 8;
        u64::from_le_bytes(bytes)
    }
}

/// A uniform integer in `0..bound` (`bound` > 0), by rejection: draw as many bits as `bound`
/// needs, and try again when the draw is out of range (less than half the time).
pub fn uniform_below(random: &mut dyn Randomness, bound: u128) -> u128 {
    assert!(bound > 0, "a uniform draw needs a non-empty range");
    if bound == 1 {
        return 0;
    }
    let bits = 128 - (bound - 1).leading_zeros();
    let mask = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    loop {
        let draw = ((u128::from(random.next_u64()) << 64) | u128::from(random.next_u64())) & mask;
        if draw < bound {
            return draw;
        }
    }
}

/// True with probability `numerator / denominator` (at most 1).
fn bernoulli(random: &mut dyn Randomness, numerator: u128, denominator: u128) -> bool {
    assert!(numerator <= denominator && denominator > 0);
    uniform_below(random, denominator) < numerator
}

/// True with probability `exp(−numerator / denominator)` (Canonne et al., algorithm 1).
pub fn bernoulli_exp(random: &mut dyn Randomness, numerator: u128, denominator: u128) -> bool {
    assert!(denominator > 0);
    // exp(−γ) for γ > 1 is a product of exp(−1)s and one exp(−(γ − ⌊γ⌋)).
    for _ in 0..numerator / denominator {
        if !bernoulli_exp_at_most_one(random, 1, 1) {
            return false;
        }
    }
    bernoulli_exp_at_most_one(random, numerator % denominator, denominator)
}

/// `exp(−γ)` for γ in [0, 1]: draw Bernoulli(γ/k) for k = 1, 2, … until one fails; the chance
/// that the first failure comes at an odd k is the series of exp(−γ).
fn bernoulli_exp_at_most_one(
    random: &mut dyn Randomness,
    numerator: u128,
    denominator: u128,
) -> bool {
    let mut k: u128 = 1;
    while bernoulli(random, numerator, denominator * k) {
        k += 1;
    }
    k % 2 == 1
}

/// A discrete Laplace draw of scale `scale_numerator / scale_denominator`: the integer `z` with
/// probability proportional to `exp(−|z| / scale)` (Canonne et al., algorithm 2). Its variance
/// is `2a / (1 − a)²` with `a = exp(−1/scale)`.
pub fn discrete_laplace(
    random: &mut dyn Randomness,
    scale_numerator: u128,
    scale_denominator: u128,
) -> i128 {
    assert!(scale_numerator > 0 && scale_denominator > 0);
    let (t, s) = (scale_numerator, scale_denominator);
    loop {
        // X = U + t·V is geometric with P(X = x) ∝ exp(−x / t): U uniform below t kept with
        // probability exp(−U/t), V geometric with ratio exp(−1).
        let u = uniform_below(random, t);
        if !bernoulli_exp(random, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(random, 1, 1) {
            v += 1;
        }
        // Y = ⌊X / s⌋ is geometric with ratio exp(−s/t) = exp(−1/scale).
        let y = (u + t * v) / s;
        let negative = bernoulli(random, 1, 2);
        if negative && y == 0 {
            // Zero would otherwise come up twice as often as it should.
            continue;
        }
        let y = i128::try_from(y).unwrap_or(i128::MAX);
        return if negative { -y } else { y };
    }
}

/// The least `k` with `P(|Z| > k) ≤ alpha` for a discrete Laplace `Z` of scale `scale`: the
/// half-width of its two-sided `1 − alpha` interval. `P(|Z| > k) = 2 a^(k+1) / (1 + a)` with
/// `a = exp(−1/scale)`. Zero for scale 0 (no noise).
pub fn discrete_laplace_bound(scale: f64, alpha: f64) -> u128 {
    if scale <= 0.0 {
        return 0;
    }
    let a = (-1.0 / scale).exp();
    // a^(k+1) ≤ alpha (1 + a) / 2  ⇔  (k + 1) ≥ ln(alpha (1 + a) / 2) / ln(a), ln(a) = −1/scale.
    let needed = (alpha * (1.0 + a) / 2.0).ln() * -scale;
    let mut k = (needed.ceil() - 1.0).max(0.0) as u128;
    // The float above may land one off at a boundary; settle it on the exact condition.
    let tail = |k: u128| 2.0 * a.powf(k as f64 + 1.0) / (1.0 + a);
    while tail(k) > alpha {
        k += 1;
    }
    while k > 0 && tail(k - 1) <= alpha {
        k -= 1;
    }
    k
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// SplitMix64: a small, well-mixed seeded generator for repeatable tests.
    pub(crate) struct Seeded(pub u64);

    impl Randomness for Seeded {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Pearson's chi-square of observed counts against expected ones.
    fn chi_square(observed: &[u64], expected: &[f64]) -> f64 {
        observed
            .iter()
            .zip(expected)
            .map(|(&o, &e)| (o as f64 - e).powi(2) / e)
            .sum()
    }

    /// The chi-square quantile at 1 − 0.001 for `df` degrees of freedom (Wilson–Hilferty), so
    /// that a correct sampler fails one run in a thousand seeds; the seeds here are fixed.
    fn chi_square_critical(df: usize) -> f64 {
        let k = df as f64;
        let z = 3.090_232; // the normal quantile at 0.999
        k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
    }

    #[test]
    fn uniform_draws_are_uniform_and_in_range() {
        let mut random = Seeded(1);
        for bound in [1u128, 2, 3, 7, 1000, (1u128 << 64) + 3, u128::MAX] {
            for _ in 0..200 {
                assert!(uniform_below(&mut random, bound) < bound);
            }
        }
        let draws = 70_000;
        let mut counts = [0u64; 7];
        for _ in 0..draws {
            counts[uniform_below(&mut random, 7) as usize] += 1;
        }
        let expected = [draws as f64 / 7.0; 7];
        let statistic = chi_square(&counts, &expected);
        assert!(statistic < chi_square_critical(6), "{statistic} {counts:?}");
        // A bound just past a power of two, where rejection matters most: the top and bottom
        // halves of the range come up equally.
        let bound = (1u128 << 100) + 1;
        let low = (0..20_000)
            .filter(|_| uniform_below(&mut random, bound) < bound / 2)
            .count();
        assert!((9_500..10_500).contains(&low), "{low}");
    }

    #[test]
    fn bernoulli_exp_matches_exp_minus_gamma() {
        let mut random = Seeded(2);
        let draws = 100_000u64;
        for (numerator, denominator) in [(0u128, 1u128), (1, 2), (1, 1), (7, 3), (5, 1)] {
            let p = (-(numerator as f64) / denominator as f64).exp();
            let hits = (0..draws)
                .filter(|_| bernoulli_exp(&mut random, numerator, denominator))
                .count() as u64;
            let expected = [p * draws as f64, (1.0 - p) * draws as f64];
            if numerator == 0 {
                assert_eq!(hits, draws);
                continue;
            }
            let statistic = chi_square(&[hits, draws - hits], &expected);
            assert!(
                statistic < chi_square_critical(1),
                "γ = {numerator}/{denominator}: {hits} of {draws}, expected {}",
                expected[0]
            );
        }
    }

    /// The discrete Laplace's exact `P(Z ≤ z)` at `scale`.
    fn cdf(scale: f64, z: i128) -> f64 {
        let a = (-1.0 / scale).exp();
        if z >= 0 {
            1.0 - a.powf(z as f64 + 1.0) / (1.0 + a)
        } else {
            a.powf(-z as f64) / (1.0 + a)
        }
    }

    /// Draws `draws` values at scale `numerator/denominator` and tests them against the exact
    /// distribution: bins of equal width around zero (one value wide for small scales), as many
    /// as keep each expected count at 20 or more, and the two tails beyond them.
    fn goodness_of_fit(seed: u64, numerator: u128, denominator: u128, draws: u64) {
        let scale = numerator as f64 / denominator as f64;
        // An odd width, so that the middle bin is centred on zero.
        let width = ((scale / 4.0).floor() as i128).max(1) | 1;
        let expected_in =
            |low: i128, high: i128| (cdf(scale, high) - cdf(scale, low - 1)) * draws as f64;
        // Bins [−half − width·j …] symmetric around zero: the middle one holds zero.
        let half = width / 2;
        let mut sides = 0i128;
        while expected_in(half + 1 + sides * width, half + (sides + 1) * width) >= 20.0 {
            sides += 1;
        }
        let edge = half + sides * width;
        let bins = (2 * sides + 3) as usize;
        let bin_of = |z: i128| -> usize {
            if z < -edge {
                0
            } else if z > edge {
                bins - 1
            } else {
                ((z + edge) / width) as usize + 1
            }
        };
        let mut random = Seeded(seed);
        let mut counts = vec![0u64; bins];
        let mut sum = 0f64;
        let mut sum_squares = 0f64;
        for _ in 0..draws {
            let z = discrete_laplace(&mut random, numerator, denominator);
            sum += z as f64;
            sum_squares += (z as f64).powi(2);
            counts[bin_of(z)] += 1;
        }
        let mut expected = vec![0.0; bins];
        expected[0] = cdf(scale, -edge - 1) * draws as f64;
        expected[bins - 1] = (1.0 - cdf(scale, edge)) * draws as f64;
        for (bin, expected) in expected.iter_mut().enumerate().take(bins - 1).skip(1) {
            let low = -edge + (bin as i128 - 1) * width;
            *expected = expected_in(low, low + width - 1);
        }
        let statistic = chi_square(&counts, &expected);
        assert!(
            statistic < chi_square_critical(bins - 1),
            "scale {scale}: chi-square {statistic} over {bins} bins"
        );
        // The mean is zero and the variance 2a/(1 − a)², within five standard errors.
        let a = (-1.0 / scale).exp();
        let variance = 2.0 * a / (1.0 - a).powi(2);
        let mean = sum / draws as f64;
        assert!(
            mean.abs() < 5.0 * (variance / draws as f64).sqrt(),
            "mean {mean}"
        );
        let observed_variance = sum_squares / draws as f64 - mean * mean;
        assert!(
            (observed_variance / variance - 1.0).abs() < 0.05,
            "variance {observed_variance}, expected {variance}"
        );
    }

    #[test]
    fn discrete_laplace_has_the_exact_distribution() {
        goodness_of_fit(3, 1, 1, 100_000);
        goodness_of_fit(4, 7, 2, 100_000);
        goodness_of_fit(5, 1, 3, 100_000);
        // A scale of the size the report uses (a clipping bound of 10⁶ cu over ε = 0.04).
        goodness_of_fit(6, 1_000_000 * 1_000_000_000, 40_000_000, 50_000);
    }

    #[test]
    fn the_stated_bound_holds_the_stated_share() {
        // Exactly: P(|Z| > k) ≤ alpha < P(|Z| > k − 1).
        for scale in [0.5, 1.0, 3.0, 25.0, 1e6] {
            let k = discrete_laplace_bound(scale, 0.05);
            let a = (-1.0f64 / scale).exp();
            let tail = |k: u128| 2.0 * a.powf(k as f64 + 1.0) / (1.0 + a);
            assert!(tail(k) <= 0.05, "scale {scale}: k {k}");
            assert!(k == 0 || tail(k - 1) > 0.05, "scale {scale}: k {k}");
        }
        assert_eq!(discrete_laplace_bound(0.0, 0.05), 0);
        // And by drawing: 95 % or more of draws fall within it.
        let mut random = Seeded(7);
        let k = discrete_laplace_bound(40.0, 0.05) as i128;
        let draws = 40_000;
        let inside = (0..draws)
            .filter(|_| discrete_laplace(&mut random, 40, 1).abs() <= k)
            .count();
        // 95 % less three standard errors of a binomial proportion.
        let floor = 0.95 - 3.0 * (0.95f64 * 0.05 / draws as f64).sqrt();
        assert!(
            inside as f64 / draws as f64 >= floor,
            "{inside} of {draws} within {k}"
        );
    }

    #[test]
    fn the_operating_system_generator_gives_varied_bits() {
        let mut random = OsRandomness::new();
        let draws: Vec<u64> = (0..20).map(|_| random.next_u64()).collect();
        let mut unique = draws.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), draws.len());
    }
}
