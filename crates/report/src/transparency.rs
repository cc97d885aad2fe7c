//! The public transparency report: how one period's compute was spread across people, every
//! number with differential-privacy noise, so that publishing it reveals next to nothing about any
//! one person.
//!
//! The privacy unit is a person (an agent's spending counts as its person's), and neighbouring
//! populations differ by one person added or removed. Each person's contribution is bounded
//! first: compute used and granted are clipped at `clip_cu`, and the per-model amounts of someone
//! over it are scaled down to it. Then each statistic is a quantity whose change when one person
//! comes or goes is at most a known sensitivity, released with discrete Laplace noise of scale
//! sensitivity ÷ its share of ε ([`BUDGET`]); the shares add up to ε, so the whole report is
//! ε-differentially private by composition. Everything else (ratios, the Gini and Lorenz shares,
//! the error bars, making the Lorenz curve rise) is computed from the noisy numbers alone, which
//! costs no privacy.
//!
//! The quantities and their sensitivities, for values clipped to `[0, C]` and sorted, `x₁ ≤ … ≤
//! xₙ` (proofs in docs/transparency.md):
//! - people with a stipend, people active: counts, 1;
//! - compute granted, compute used, used per model (as one vector, in L1): sums, `C`;
//! - the compute held by the poorest fraction `p` of people, `Q(p) = ∫₀^{pn} x₍⌈s⌉₎ ds` (the
//!   boundary person counting by the part inside): `C` (one more person shifts every rank by at
//!   most one), `C + 1` once rounded to whole cu;
//! - the Gini's numerator `W = Σ (2i − n − 1) xᵢ / n`, so that Gini = W / Σx: `C`, `C + 1`
//!   rounded (adding a person changes the sum of absolute differences by at most `2nC` and the
//!   normaliser by one person);
//! - the median, found by a bisection on a grid of at most [`MEDIAN_GRID_POINTS`] points over
//!   `[0, C]`, each step asking `#{x ≤ t} − #{x > t}`: 1 per step, the budget split across the
//!   steps.
//!
//! Each number's 95 % error bar comes from the noise alone, never from the data: a sum's is its
//! noise's 95 % bound; a share's holds both noises within their 97.5 % bounds and takes the
//! widest ratio that allows (a union bound, so it covers at least 95 %); the median's holds every
//! step within its `1 − 0.05/steps` bound and reads off the grid points the steps ruled out.

use serde::{Deserialize, Serialize};

use crate::LORENZ_POINTS;
use crate::noise::{Randomness, discrete_laplace, discrete_laplace_bound};

/// How ε is split across the statistics: each gets this share of it.
pub const BUDGET: [(&str, f64); 9] = [
    ("people_with_stipend", 0.04),
    ("people_active", 0.04),
    ("granted_cu", 0.04),
    ("used_cu", 0.12),
    ("models", 0.06),
    ("lorenz", 0.36),
    ("top_1pct_share", 0.06),
    ("gini", 0.16),
    ("median_cu", 0.12),
];

/// The most grid points the median's bisection searches: ten steps.
pub const MEDIAN_GRID_POINTS: u128 = 1024;

/// The error bars' coverage: 95 %.
const ALPHA: f64 = 0.05;

/// ε as the sampler takes it: a whole number of billionths, rounded down, so that the noise drawn
/// is never less than ε asks.
const EPSILON_DENOMINATOR: u128 = 1_000_000_000;

/// The smallest ε a report may have (one billionth would round to nothing).
pub const EPSILON_MIN: f64 = 1e-6;

/// One person's period: compute used at each model (in the order of [`Period::models`]), and
/// compute granted to them (the stipend and any grants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonPeriod {
    /// Compute used at each model, in cu.
    pub used_cu: Vec<u64>,
    /// Compute granted to them in the period, in cu.
    pub granted_cu: u64,
}

/// What the report is made from: everyone with a stipend in one period.
#[derive(Debug, Clone)]
pub struct Period {
    /// When the period began, ms since the epoch.
    pub start_ms: i64,
    /// When it ended.
    pub end_ms: i64,
    /// The models, in the order of each person's `used_cu`.
    pub models: Vec<String>,
    /// Everyone with a stipend, in any order.
    pub people: Vec<PersonPeriod>,
}

/// A published number and the half-width of its 95 % error bar.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate<T> {
    /// The number, with noise.
    pub value: T,
    /// The true number lies within `value ± error95` with probability at least 95 %.
    pub error95: T,
}

/// Compute one model served to people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelUse {
    /// The model's name.
    pub model: String,
    /// Compute used at it, clipped per person, in cu.
    pub used_cu: Estimate<u64>,
}

/// The share of ε one statistic spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetShare {
    /// The statistic.
    pub statistic: String,
    /// Its ε.
    pub epsilon: f64,
}

/// One period's transparency report, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When the period began, ms since the epoch.
    pub period_start_ms: i64,
    /// When it ended.
    pub period_end_ms: i64,
    /// The privacy budget the report spent: its numbers together are ε-differentially private.
    pub epsilon: f64,
    /// Each person's compute used and granted is clipped at this before counting, in cu.
    pub clip_cu: u64,
    /// People with a stipend in the period.
    pub people_with_stipend: Estimate<u64>,
    /// People who used any compute.
    pub people_active: Estimate<u64>,
    /// Compute granted to people (stipends and grants), clipped per person.
    pub granted_cu: Estimate<u64>,
    /// Compute used by people, clipped per person.
    pub used_cu: Estimate<u64>,
    /// Compute used at each model.
    pub models: Vec<ModelUse>,
    /// The Gini coefficient of compute used across people.
    pub gini: Estimate<f64>,
    /// The share of compute used by the poorest 0 %, 10 %, …, 100 % of people.
    pub lorenz: Vec<Estimate<f64>>,
    /// The share used by the top 1 % of people.
    pub top_1pct_share: Estimate<f64>,
    /// The share used by the top 10 % of people.
    pub top_10pct_share: Estimate<f64>,
    /// The median person's compute used (the lower median), in cu.
    pub median_cu: Estimate<u64>,
    /// How ε was split across the statistics.
    pub budget: Vec<BudgetShare>,
}

/// Why a report cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportError {
    /// ε is not a positive, finite number of at least [`EPSILON_MIN`].
    #[error(
        "the transparency report's ε must be a finite number of at least {EPSILON_MIN}, got {0}"
    )]
    Epsilon(f64),
    /// The clipping bound is zero: nothing anyone did would count.
    #[error("the transparency report's clipping bound must be at least 1 cu")]
    Clip,
}

/// Checks a report's ε.
pub fn check_epsilon(epsilon: f64) -> Result<(), ReportError> {
    if epsilon.is_finite() && epsilon >= EPSILON_MIN {
        Ok(())
    } else {
        Err(ReportError::Epsilon(epsilon))
    }
}

/// The period's report with ε-differential privacy, noise drawn from `random`.
pub fn publish(
    period: &Period,
    epsilon: f64,
    clip_cu: u64,
    random: &mut dyn Randomness,
) -> Result<Report, ReportError> {
    check_epsilon(epsilon)?;
    if clip_cu == 0 {
        return Err(ReportError::Clip);
    }
    Ok(release(period, clip_cu, Some((epsilon, random))))
}

/// The period's report with no noise at all (ε = ∞): for tests only, which compare it with the
/// exact statistics.
#[cfg(test)]
pub(crate) fn exact(period: &Period, clip_cu: u64) -> Report {
    release(period, clip_cu, None)
}

/// The exact quantities, before noise.
struct Exact {
    people: u64,
    people_active: u64,
    granted_cu: u128,
    used_cu: u128,
    models_cu: Vec<u128>,
    /// `10·Q(k/10)` for k = 1..9 (tenths of cu, exact).
    lorenz_tenths: [u128; 9],
    /// `100·Q(0.99)`.
    below_top_1pct_hundredths: u128,
    /// `n·W`: Σ (2i − n − 1) xᵢ.
    gini_numerator_n: i128,
    /// The clipped values, sorted.
    sorted: Vec<u64>,
}

impl Exact {
    fn of(period: &Period, clip_cu: u64) -> Exact {
        let clip = u128::from(clip_cu);
        let mut models_cu = vec![0u128; period.models.len()];
        let mut sorted = Vec::with_capacity(period.people.len());
        let mut granted_cu = 0u128;
        for person in &period.people {
            let total: u128 = person.used_cu.iter().map(|&cu| u128::from(cu)).sum();
            for (sum, &cu) in models_cu.iter_mut().zip(&person.used_cu) {
                // Someone over the bound is scaled down to it, model by model.
                *sum += if total > clip {
                    u128::from(cu) * clip / total
                } else {
                    u128::from(cu)
                };
            }
            sorted.push(total.min(clip) as u64);
            granted_cu += u128::from(person.granted_cu.min(clip_cu));
        }
        sorted.sort_unstable();
        let n = sorted.len() as u128;
        let used_cu: u128 = sorted.iter().map(|&x| u128::from(x)).sum();
        // Prefix sums: held[i] is what the poorest i people hold.
        let mut held = Vec::with_capacity(sorted.len() + 1);
        held.push(0u128);
        for &x in &sorted {
            held.push(held[held.len() - 1] + u128::from(x));
        }
        // q·Q(p) for p = k/q: the poorest ⌊kn/q⌋ whole, and (kn mod q)/q of the next.
        let scaled_below = |k: u128, q: u128| -> u128 {
            let whole = (k * n / q) as usize;
            let part = k * n % q;
            let next = sorted.get(whole).map_or(0, |&x| u128::from(x));
            q * held[whole] + part * next
        };
        let mut lorenz_tenths = [0u128; 9];
        for (index, tenths) in lorenz_tenths.iter_mut().enumerate() {
            *tenths = scaled_below(index as u128 + 1, 10);
        }
        let gini_numerator_n = sorted
            .iter()
            .enumerate()
            .map(|(index, &x)| (2 * (index as i128 + 1) - n as i128 - 1) * i128::from(x))
            .sum();
        Exact {
            people: n as u64,
            people_active: sorted.iter().filter(|&&x| x > 0).count() as u64,
            granted_cu,
            used_cu,
            models_cu,
            lorenz_tenths,
            below_top_1pct_hundredths: scaled_below(99, 100),
            gini_numerator_n,
            sorted,
        }
    }

    /// `#{x ≤ t} − #{x > t}`: at least 0 from the lower median on.
    fn balance_at(&self, t: u128) -> i128 {
        let at_or_below = self.sorted.partition_point(|&x| u128::from(x) <= t) as i128;
        2 * at_or_below - self.sorted.len() as i128
    }

    /// The lower median: the least value with at least half of people at or below it.
    fn lower_median(&self) -> u64 {
        match self.sorted.len() {
            0 => 0,
            n => self.sorted[n.div_ceil(2) - 1],
        }
    }
}

/// Draws noise for one statistic, or none when there is no ε (tests only).
struct Noise<'a> {
    epsilon: Option<(f64, &'a mut dyn Randomness)>,
}

impl Noise<'_> {
    fn share(&self, statistic: &str) -> f64 {
        let share = BUDGET
            .iter()
            .find(|(name, _)| *name == statistic)
            .map_or(0.0, |(_, share)| *share);
        self.epsilon
            .as_ref()
            .map_or(f64::INFINITY, |(epsilon, _)| epsilon * share)
    }

    /// The scale of the noise a quantity of `sensitivity` gets from `epsilon`, as the sampler's
    /// fraction (numerator, denominator), or `None` without noise.
    fn scale(&self, sensitivity: u128, epsilon: f64) -> Option<(u128, u128)> {
        self.epsilon.as_ref()?;
        let denominator = ((epsilon * EPSILON_DENOMINATOR as f64).floor() as u128).max(1);
        Some((sensitivity * EPSILON_DENOMINATOR, denominator))
    }

    /// `value` plus noise for `sensitivity` at `epsilon`, and the noise's bound at `alpha`.
    fn add(&mut self, value: i128, sensitivity: u128, epsilon: f64, alpha: f64) -> (i128, u128) {
        let Some((numerator, denominator)) = self.scale(sensitivity, epsilon) else {
            return (value, 0);
        };
        let Some((_, random)) = self.epsilon.as_mut() else {
            return (value, 0);
        };
        let noise = discrete_laplace(&mut **random, numerator, denominator);
        let bound = discrete_laplace_bound(numerator as f64 / denominator as f64, alpha);
        (value.saturating_add(noise), bound)
    }
}

/// A ratio of two noisy numbers, each within its bound with probability 97.5 % or more, as a share
/// in [0, 1] with the widest error those bounds allow; `fallback` when the denominator is no
/// bigger than its own noise.
fn share_of(numerator: (f64, f64), denominator: (f64, f64), fallback: f64) -> Estimate<f64> {
    let (n, n_bound) = numerator;
    let (d, d_bound) = denominator;
    if d <= 0.0 {
        return widest(fallback, 0.0, 1.0);
    }
    let value = (n / d).clamp(0.0, 1.0);
    let low = ((n - n_bound) / (d + d_bound)).clamp(0.0, 1.0);
    let high = if d > d_bound {
        ((n + n_bound) / (d - d_bound)).clamp(0.0, 1.0)
    } else {
        1.0
    };
    widest(value, low, high)
}

/// `value` with the error bar that reaches both ends of `[low, high]`.
fn widest(value: f64, low: f64, high: f64) -> Estimate<f64> {
    Estimate {
        value,
        error95: (high - value).max(value - low).max(0.0),
    }
}

/// Makes the Lorenz shares what a Lorenz curve is: rising (by pooling adjacent violators, least
/// squares onto rising sequences) and never above the diagonal (the poorest fraction `p` hold at
/// most `p`; `ceilings` are those `p`). The true value lies in its interval and in [0, p] both,
/// so each interval is cut to that; each error bar then reaches both ends of its interval from
/// the new value, so what it covers is unchanged.
fn lorenz_shaped(points: &mut [Estimate<f64>], ceilings: &[f64]) {
    let intervals: Vec<(f64, f64)> = points
        .iter()
        .zip(ceilings)
        .map(|(point, &ceiling)| {
            let high = (point.value + point.error95).min(ceiling);
            let low = (point.value - point.error95).max(0.0).min(high);
            (low, high)
        })
        .collect();
    // Blocks of (sum, count), merged while a block's mean is below the one before it.
    let mut blocks: Vec<(f64, usize)> = Vec::new();
    for point in points.iter() {
        blocks.push((point.value, 1));
        while blocks.len() > 1 {
            let (sum, count) = blocks[blocks.len() - 1];
            let (previous_sum, previous_count) = blocks[blocks.len() - 2];
            if sum / count as f64 >= previous_sum / previous_count as f64 {
                break;
            }
            blocks.pop();
            let last = blocks.len() - 1;
            blocks[last] = (previous_sum + sum, previous_count + count);
        }
    }
    let mut index = 0;
    for (sum, count) in blocks {
        for _ in 0..count {
            let (low, high) = intervals[index];
            // Under the diagonal; the minimum of two rising sequences still rises.
            let value = (sum / count as f64).min(ceilings[index]).max(0.0);
            points[index] = widest(value, low, high);
            index += 1;
        }
    }
}

fn release(period: &Period, clip_cu: u64, epsilon: Option<(f64, &mut dyn Randomness)>) -> Report {
    let exact = Exact::of(period, clip_cu);
    let report_epsilon = epsilon
        .as_ref()
        .map_or(f64::INFINITY, |(epsilon, _)| *epsilon);
    let mut noise = Noise { epsilon };
    let clip = u128::from(clip_cu);
    let count = |noise: &mut Noise<'_>, value: u128, sensitivity: u128, statistic: &str| {
        let epsilon = noise.share(statistic);
        let (noisy, bound) = noise.add(value as i128, sensitivity, epsilon, ALPHA);
        Estimate {
            value: noisy.clamp(0, i128::from(u64::MAX)) as u64,
            error95: bound.min(u128::from(u64::MAX)) as u64,
        }
    };
    let mut people_with_stipend = count(
        &mut noise,
        u128::from(exact.people),
        1,
        "people_with_stipend",
    );
    let people_active = count(
        &mut noise,
        u128::from(exact.people_active),
        1,
        "people_active",
    );
    // Everyone active has a stipend. Both draws have the same scale, so when the active count is
    // the larger, it is within the same bound of the true number of people.
    people_with_stipend.value = people_with_stipend.value.max(people_active.value);
    let granted_cu = count(&mut noise, exact.granted_cu, clip, "granted_cu");
    let used_cu = count(&mut noise, exact.used_cu, clip, "used_cu");
    // The per-model sums are one vector whose L1 sensitivity is the bound: each gets the whole
    // share's noise.
    let models = period
        .models
        .iter()
        .zip(&exact.models_cu)
        .map(|(model, &cu)| ModelUse {
            model: model.clone(),
            used_cu: count(&mut noise, cu, clip, "models"),
        })
        .collect();

    // The total as a denominator: its noise's 97.5 % bound.
    let exact_total = exact.used_cu as f64;
    let (total, total_bound) = {
        let epsilon = noise.share("used_cu");
        let bound = noise.scale(clip, epsilon).map_or(0.0, |(n, d)| {
            discrete_laplace_bound(n as f64 / d as f64, ALPHA / 2.0) as f64
        });
        // The same noisy total as published, not a second draw.
        (used_cu.value as f64, bound)
    };
    let noisy = noise.epsilon.is_some();
    // A rounded quantity of tenths (or hundredths) of cu, with noise; exact without ε.
    let held = |noise: &mut Noise<'_>, scaled: u128, scale: u128, epsilon: f64| -> (f64, f64) {
        if !noisy {
            return (scaled as f64 / scale as f64, 0.0);
        }
        let rounded = ((scaled + scale / 2) / scale) as i128;
        let (value, bound) = noise.add(rounded, clip + 1, epsilon, ALPHA / 2.0);
        // Half a cu of rounding on top of the noise.
        (value as f64, bound as f64 + 0.5)
    };
    let denominator = if noisy {
        (total, total_bound)
    } else {
        (exact_total, 0.0)
    };

    let mut lorenz = Vec::with_capacity(LORENZ_POINTS);
    lorenz.push(Estimate {
        value: 0.0,
        error95: 0.0,
    });
    let per_point = noise.share("lorenz") / exact.lorenz_tenths.len() as f64;
    for (index, &tenths) in exact.lorenz_tenths.iter().enumerate() {
        let below = held(&mut noise, tenths, 10, per_point);
        lorenz.push(share_of(below, denominator, (index + 1) as f64 / 10.0));
    }
    lorenz.push(Estimate {
        value: 1.0,
        error95: 0.0,
    });
    let ceilings: Vec<f64> = (1..LORENZ_POINTS - 1)
        .map(|index| index as f64 / (LORENZ_POINTS - 1) as f64)
        .collect();
    lorenz_shaped(&mut lorenz[1..LORENZ_POINTS - 1], &ceilings);
    let top_10pct_share = Estimate {
        value: 1.0 - lorenz[9].value,
        error95: lorenz[9].error95,
    };
    let epsilon = noise.share("top_1pct_share");
    let below_top = held(&mut noise, exact.below_top_1pct_hundredths, 100, epsilon);
    let mut below_top = [share_of(below_top, denominator, 0.99)];
    lorenz_shaped(&mut below_top, &[0.99]);
    let [below_top] = below_top;
    // The top 1 % hold no more than the top 10 %.
    let top_1pct_value = (1.0 - below_top.value).min(top_10pct_share.value);
    let top_1pct_share = widest(
        top_1pct_value,
        1.0 - below_top.value - below_top.error95,
        1.0 - below_top.value + below_top.error95,
    );

    let gini = {
        let n = exact.people.max(1) as i128;
        let epsilon = noise.share("gini");
        let numerator = if noisy {
            // n·W rounded to whole cu of W, exactly.
            let rounded = (2 * exact.gini_numerator_n + n).div_euclid(2 * n);
            let (value, bound) = noise.add(rounded, clip + 1, epsilon, ALPHA / 2.0);
            (value as f64, bound as f64 + 0.5)
        } else {
            (exact.gini_numerator_n as f64 / n as f64, 0.0)
        };
        share_of(numerator, denominator, 0.0)
    };

    let median_cu = median(&exact, clip, &mut noise);
    let budget = BUDGET
        .iter()
        .map(|(statistic, share)| BudgetShare {
            statistic: statistic.to_string(),
            epsilon: report_epsilon * share,
        })
        .collect();
    Report {
        period_start_ms: period.start_ms,
        period_end_ms: period.end_ms,
        epsilon: report_epsilon,
        clip_cu,
        people_with_stipend,
        people_active,
        granted_cu,
        used_cu,
        models,
        gini,
        lorenz,
        top_1pct_share,
        top_10pct_share,
        median_cu,
        budget,
    }
}

/// The lower median by a noisy bisection over a grid on `[0, clip]`, with the error bar read off
/// the grid points the steps ruled out.
fn median(exact: &Exact, clip: u128, noise: &mut Noise) -> Estimate<u64> {
    if noise.epsilon.is_none() {
        return Estimate {
            value: exact.lower_median(),
            error95: 0,
        };
    }
    let points = (clip + 1).min(MEDIAN_GRID_POINTS);
    let point = |index: u128| index * clip / (points - 1).max(1);
    let steps = (128 - (points - 1).leading_zeros()).max(1);
    let epsilon = noise.share("median_cu") / f64::from(steps);
    let alpha = ALPHA / f64::from(steps);
    let (mut low, mut high) = (0u128, points - 1);
    let mut asked = Vec::new();
    let mut bound = 0;
    while low < high {
        let middle = (low + high) / 2;
        let t = point(middle);
        let (balance, step_bound) = noise.add(exact.balance_at(t), 1, epsilon, alpha);
        bound = step_bound as i128;
        asked.push((t, balance));
        if balance >= 0 {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    let value = point(low);
    // Where the true lower median can be when every step's noise is within its bound: above
    // each point whose balance was surely negative, at or below each surely not.
    let floor = asked
        .iter()
        .filter(|(_, balance)| balance + bound < 0)
        .map(|(t, _)| t + 1)
        .max()
        .unwrap_or(0);
    let ceiling = asked
        .iter()
        .filter(|(_, balance)| balance - bound >= 0)
        .map(|(t, _)| *t)
        .min()
        .unwrap_or(clip);
    let error95 = ceiling.abs_diff(value).max(value.abs_diff(floor));
    Estimate {
        value: value.min(u128::from(u64::MAX)) as u64,
        error95: error95.min(u128::from(u64::MAX)) as u64,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::Distribution;
    use crate::noise::tests::Seeded;
    use proptest::prelude::*;

    /// A known, unequal population of `n`: person i used about 20 000 cu · (i/n)³ at one model
    /// and a tenth of that at another; every fifth used nothing; everyone was granted 50 000.
    fn population(n: u64) -> Period {
        let people = (0..n)
            .map(|index| {
                let used = if index % 5 == 0 {
                    0
                } else {
                    20_000 * index.pow(3) / n.pow(3) + 1
                };
                PersonPeriod {
                    used_cu: vec![used, used / 10],
                    granted_cu: 50_000,
                }
            })
            .collect();
        Period {
            start_ms: 0,
            end_ms: 86_400_000,
            models: vec!["big".to_string(), "small".to_string()],
            people,
        }
    }

    /// Each person's clipped total, as the report counts it.
    fn clipped(period: &Period, clip_cu: u64) -> Vec<u64> {
        period
            .people
            .iter()
            .map(|person| person.used_cu.iter().sum::<u64>().min(clip_cu))
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn without_noise_the_report_is_the_exact_distribution() {
        let period = population(10_000);
        // A bound some people exceed, so that clipping is exercised too.
        let clip_cu = 15_000;
        let report = exact(&period, clip_cu);
        let truth = Distribution::of(clipped(&period, clip_cu));
        assert!(
            close(report.gini.value, truth.gini),
            "{} {}",
            report.gini.value,
            truth.gini
        );
        for (point, exact) in report.lorenz.iter().zip(truth.lorenz) {
            assert!(close(point.value, exact), "{point:?} {exact}");
            assert_eq!(point.error95, 0.0);
        }
        assert!(close(report.top_10pct_share.value, truth.top_10pct_share));
        assert!(close(report.top_1pct_share.value, truth.top_1pct_share));
        assert_eq!(report.used_cu.value as u128, truth.used_cu);
        assert_eq!(report.people_with_stipend.value, 10_000);
        assert_eq!(report.people_active.value, truth.people_active);
        assert_eq!(report.granted_cu.value, 10_000 * 15_000);
        let mut sorted = clipped(&period, clip_cu);
        sorted.sort_unstable();
        assert_eq!(report.median_cu.value, sorted[4_999]);
        // Per model: people over the bound are scaled down to it, model by model.
        let models: u64 = report.models.iter().map(|model| model.used_cu.value).sum();
        assert!(models <= report.used_cu.value && models + 10_000 >= report.used_cu.value);
        assert!(
            report.gini.value > 0.3,
            "a test population as unequal as promised"
        );
    }

    #[test]
    fn with_epsilon_one_the_truth_is_within_the_error_bars_95_percent_of_the_time() {
        let period = population(10_000);
        let clip_cu = 20_000;
        let truth = exact(&period, clip_cu);
        let runs = 400;
        // Hits per statistic: every share and the median are held to 95 %; their bars are union
        // bounds, so they should cover more.
        let mut shares: Vec<usize> = Vec::new();
        // The single-noise sums: 95 % exactly in expectation, so held to 95 % less three binomial
        // standard errors over these runs.
        let mut sums = [0usize; 4];
        let within_f = |estimate: Estimate<f64>, truth: f64| {
            (estimate.value - truth).abs() <= estimate.error95 + 1e-12
        };
        let within_u = |estimate: Estimate<u64>, truth: u64| {
            estimate.value.abs_diff(truth) <= estimate.error95
        };
        for seed in 0..runs {
            let report = publish(&period, 1.0, clip_cu, &mut Seeded(1000 + seed)).unwrap();
            let mut hits = vec![
                within_f(report.gini, truth.gini.value),
                within_f(report.top_1pct_share, truth.top_1pct_share.value),
                within_f(report.top_10pct_share, truth.top_10pct_share.value),
                within_u(report.median_cu, truth.median_cu.value),
            ];
            for (point, exact) in report.lorenz.iter().zip(&truth.lorenz) {
                if exact.value != 0.0 && exact.value != 1.0 {
                    hits.push(within_f(*point, exact.value));
                }
            }
            shares.resize(hits.len(), 0);
            for (count, hit) in shares.iter_mut().zip(&hits) {
                *count += usize::from(*hit);
            }
            for (count, hit) in sums.iter_mut().zip([
                within_u(report.people_with_stipend, truth.people_with_stipend.value),
                within_u(report.people_active, truth.people_active.value),
                within_u(report.used_cu, truth.used_cu.value),
                within_u(report.granted_cu, truth.granted_cu.value),
            ]) {
                *count += usize::from(hit);
            }
        }
        let runs = runs as f64;
        // The Gini, both top shares, the median, and the Lorenz points not exactly 0 (the
        // poorest fifth used nothing).
        assert_eq!(shares.len(), 4 + 7);
        for (index, hits) in shares.iter().enumerate() {
            assert!(
                *hits as f64 / runs >= 0.95,
                "statistic {index}: {hits} of {runs}"
            );
        }
        let floor = 0.95 - 3.0 * (0.95 * 0.05 / runs).sqrt();
        for (index, hits) in sums.iter().enumerate() {
            assert!(
                *hits as f64 / runs >= floor,
                "sum {index}: {hits} of {runs}"
            );
        }
        // And the bars are useful on 10 000 people: the Gini to within a few hundredths.
        let report = publish(&period, 1.0, clip_cu, &mut Seeded(7)).unwrap();
        assert!(report.gini.error95 < 0.05, "{:?}", report.gini);
        assert!(report.lorenz[5].error95 < 0.1, "{:?}", report.lorenz[5]);
    }

    /// The standard deviation of the published total's noise over `runs` reports.
    fn total_noise_deviation(period: &Period, epsilon: f64, clip_cu: u64, runs: u64) -> f64 {
        let truth = exact(period, clip_cu).used_cu.value as f64;
        let squares: f64 = (0..runs)
            .map(|seed| {
                let report = publish(period, epsilon, clip_cu, &mut Seeded(seed)).unwrap();
                (report.used_cu.value as f64 - truth).powi(2)
            })
            .sum();
        (squares / runs as f64).sqrt()
    }

    #[test]
    fn the_noise_scale_follows_epsilon_and_the_clipping_bound() {
        let period = population(500);
        let runs = 3_000;
        // The total gets 0.12 of ε at sensitivity C: a discrete Laplace of scale C / (0.12 ε),
        // whose standard deviation is close to √2 times the scale.
        for (epsilon, clip_cu) in [(1.0, 20_000u64), (2.0, 20_000), (1.0, 40_000)] {
            let scale = clip_cu as f64 / (0.12 * epsilon);
            let a = (-1.0 / scale).exp();
            let expected = (2.0 * a).sqrt() / (1.0 - a);
            let observed = total_noise_deviation(&period, epsilon, clip_cu, runs);
            // The standard error of a Laplace sample's deviation over 3 000 draws is about 2 %.
            assert!(
                (observed / expected - 1.0).abs() < 0.08,
                "ε {epsilon}, C {clip_cu}: deviation {observed}, expected {expected}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_report_and_bad_settings_are_refused() {
        let period = population(100);
        let first = publish(&period, 1.0, 20_000, &mut Seeded(9)).unwrap();
        assert_eq!(
            first,
            publish(&period, 1.0, 20_000, &mut Seeded(9)).unwrap()
        );
        assert_ne!(
            first,
            publish(&period, 1.0, 20_000, &mut Seeded(10)).unwrap()
        );
        for epsilon in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-9] {
            assert!(matches!(
                publish(&period, epsilon, 20_000, &mut Seeded(9)),
                Err(ReportError::Epsilon(_))
            ));
        }
        assert_eq!(
            publish(&period, 1.0, 0, &mut Seeded(9)),
            Err(ReportError::Clip)
        );
        // Shares stay shares and the curve rises, whatever the noise.
        for seed in 0..50 {
            let report = publish(&period, 0.05, 20_000, &mut Seeded(seed)).unwrap();
            assert!(
                report
                    .lorenz
                    .windows(2)
                    .all(|pair| pair[0].value <= pair[1].value)
            );
            for (index, point) in report.lorenz.iter().enumerate() {
                assert!(
                    point.value <= index as f64 / 10.0 + 1e-12,
                    "{point:?} above the diagonal"
                );
                assert!(point.error95 <= 1.0, "{point:?}");
            }
            assert!(report.people_with_stipend.value >= report.people_active.value);
            assert!(report.top_1pct_share.value >= 0.01 - 1e-12);
            for share in report
                .lorenz
                .iter()
                .chain([&report.gini, &report.top_1pct_share])
            {
                assert!((0.0..=1.0).contains(&share.value), "{share:?}");
            }
            assert!(report.top_1pct_share.value <= report.top_10pct_share.value);
            let spent: f64 = report.budget.iter().map(|share| share.epsilon).sum();
            assert!((spent - 0.05).abs() < 1e-12);
        }
    }

    #[test]
    fn nobody_and_everybody_equal() {
        let empty = Period {
            start_ms: 0,
            end_ms: 1,
            models: vec!["m".to_string()],
            people: Vec::new(),
        };
        let report = exact(&empty, 100);
        assert_eq!(report.used_cu.value, 0);
        assert_eq!(report.median_cu.value, 0);
        assert!(publish(&empty, 1.0, 100, &mut Seeded(1)).is_ok());
        let equal = Period {
            people: vec![
                PersonPeriod {
                    used_cu: vec![70],
                    granted_cu: 100
                };
                40
            ],
            ..empty
        };
        let report = exact(&equal, 100);
        assert!(close(report.gini.value, 0.0));
        assert!(close(report.lorenz[3].value, 0.3));
        assert_eq!(report.median_cu.value, 70);
    }

    proptest! {
        /// The sensitivities the noise is scaled to: one person more changes each quantity by at
        /// most what the module's proof says.
        #[test]
        fn one_person_moves_each_quantity_at_most_its_sensitivity(
            values in proptest::collection::vec(0u64..=1_000, 0..60),
            added in 0u64..=1_000,
            t in 0u128..=1_000,
        ) {
            let clip = 1_000u128;
            let period_of = |values: &[u64]| Period {
                start_ms: 0,
                end_ms: 1,
                models: vec!["m".to_string()],
                people: values
                    .iter()
                    .map(|&used| PersonPeriod { used_cu: vec![used], granted_cu: used })
                    .collect(),
            };
            let before = Exact::of(&period_of(&values), clip as u64);
            let mut more = values.clone();
            more.push(added);
            let after = Exact::of(&period_of(&more), clip as u64);
            for (b, a) in before.lorenz_tenths.iter().zip(&after.lorenz_tenths) {
                prop_assert!(a.abs_diff(*b) <= 10 * clip, "Q(p): {b} → {a}");
            }
            prop_assert!(
                after.below_top_1pct_hundredths.abs_diff(before.below_top_1pct_hundredths)
                    <= 100 * clip
            );
            // W = numerator / n, compared as fractions.
            let w = |exact: &Exact| exact.gini_numerator_n as f64 / exact.people.max(1) as f64;
            prop_assert!((w(&after) - w(&before)).abs() <= clip as f64 + 1e-9);
            prop_assert!(after.balance_at(t).abs_diff(before.balance_at(t)) <= 1);
            prop_assert!(after.used_cu.abs_diff(before.used_cu) <= clip);
            prop_assert!(after.granted_cu.abs_diff(before.granted_cu) <= clip);
        }
    }
}
